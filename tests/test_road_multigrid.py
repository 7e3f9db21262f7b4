"""ROAD's imputation by multigrid-preconditioned conjugate gradients (`road.mg_solve`).

Checked against independent computations: the Galerkin coarse operator against P^T A P formed as
dense matrices, the cycle's symmetry and positive definiteness (what conjugate gradients needs of a
preconditioner) on random vectors, and the imputed images against SciPy's sparse LU per image on
grids large enough for several levels, odd sides included.
"""
import numpy as np
import pytest
import torch

from transexplain.evaluation.metrics import curves, road


def _dense(coef):
    """(9, H, W) stencil coefficients -> the (H*W, H*W) matrix, built pixel by pixel."""
    _, h, w = coef.shape
    a = np.zeros((h * w, h * w))
    for i in range(h):
        for j in range(w):
            for k, (dr, dc) in enumerate(road._OFFSETS):
                ii, jj = i + dr, j + dc
                if 0 <= ii < h and 0 <= jj < w:
                    a[i * w + j, ii * w + jj] += coef[k, i, j]
                else:
                    assert coef[k, i, j] == 0  # nothing couples outside the grid
    return a


def _masks(h, w, n, seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, h, w, generator=g, dtype=torch.float64)
    fractions = np.linspace(0.15, 0.95, n)
    return torch.stack([road.road_masks(maps[i:i + 1], fractions=(float(f),))[0, 0] for i, f in enumerate(fractions)])


def test_operator_is_the_road_matrix():
    removed = _masks(5, 6, 3, 0)
    coef = road.road_operator(removed, torch.float64).numpy()
    for s in range(3):
        a = _dense(coef[s])
        gone = removed[s].numpy().reshape(-1)
        # the same matrix as the brute force of tests/test_metric_suite.py: on the removed pixels
        # d_i on the diagonal and -w_ij to removed neighbours; kept rows and columns are zero
        want = np.zeros_like(a)
        for i in range(5):
            for j in range(6):
                if not removed[s, i, j]:
                    continue
                for (dr, dc), wt in road.NEIGHBOUR_WEIGHTS.items():
                    ii, jj = i + dr, j + dc
                    if 0 <= ii < 5 and 0 <= jj < 6:
                        want[i * 6 + j, i * 6 + j] += wt
                        if removed[s, ii, jj]:
                            want[i * 6 + j, ii * 6 + jj] -= wt
        assert np.abs(a - want).max() < 1e-15
        assert np.allclose(a, a.T) and not a[~gone].any()


@pytest.mark.parametrize("h,w", [(6, 8), (7, 9), (5, 1)])
def test_coarse_operator_is_galerkin(h, w):
    removed = _masks(h, w, 2, 1)
    coef = road.road_operator(removed, torch.float64)
    coarse = road._coarsen(coef)
    hc, wc = (h + 1) // 2, (w + 1) // 2
    assert coarse.shape[-2:] == (hc, wc)
    p = np.zeros((h * w, hc * wc))  # piecewise-constant prolongation: pixel (i, j) -> cell (i // 2, j // 2)
    for i in range(h):
        for j in range(w):
            p[i * w + j, (i // 2) * wc + j // 2] = 1
    for s in range(2):
        want = p.T @ _dense(coef[s].numpy()) @ p
        assert np.abs(_dense(coarse[s].numpy()) - want).max() < 1e-15


def test_restriction_is_the_transpose_of_prolongation():
    g = torch.Generator().manual_seed(2)
    r = torch.randn(2, 3, 7, 9, generator=g, dtype=torch.float64)
    e = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    # <P e, r> = <e, P^T r> for every e and r
    assert torch.allclose((road._prolong(e, 7, 9) * r).sum(), (e * road._restrict(r)).sum(), rtol=1e-14)


def test_cycle_is_a_symmetric_positive_definite_preconditioner():
    removed = _masks(40, 36, 3, 3)  # 40 x 36 -> 20 x 18 -> 10 x 9 (dense): three levels
    cycle = road._Multigrid(removed, torch.float64)
    assert len(cycle.levels) == 3
    g = torch.Generator().manual_seed(4)
    m = removed.unsqueeze(1).double()
    r1 = torch.randn(3, 2, 40, 36, generator=g, dtype=torch.float64) * m
    r2 = torch.randn(3, 2, 40, 36, generator=g, dtype=torch.float64) * m
    z1, z2 = cycle(r1), cycle(r2)
    assert (z1[~removed.unsqueeze(1).expand_as(z1)] == 0).all()  # nothing on kept pixels
    a, b = (r2 * z1).sum((2, 3)), (r1 * z2).sum((2, 3))
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)  # <r2, B r1> = <r1, B r2>
    assert ((r1 * z1).sum((2, 3)) > 0).all()


@pytest.mark.parametrize("h,w", [(48, 48), (37, 53)])
def test_multigrid_imputation_equals_scipy(h, w):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64)
    maps = curves.gaussian_blur(torch.rand(2, 1, h, w, generator=g, dtype=torch.float64), 9, 3.0)[:, 0]
    masks = torch.cat([road.road_masks(maps, road.FRACTIONS, most) for most in (True, False)], 1)
    f = masks.shape[1]
    xs, ms = x.unsqueeze(1).expand(2, f, 3, h, w).reshape(-1, 3, h, w), masks.reshape(-1, h, w)
    want = np.stack([road.scipy_impute(a.numpy(), b.numpy()) for a, b in zip(xs, ms)])
    got = road.noisy_linear_impute(xs, ms, noise=0.0, method="mg").numpy()
    assert np.abs(got - want).max() < 1e-11
    got32 = road.noisy_linear_impute(xs.float(), ms, noise=0.0, method="mg").double().numpy()
    assert np.abs(got32 - want).max() < 1e-4


def test_multigrid_degenerate_masks():
    x = torch.randn(3, 2, 20, 20, dtype=torch.float64)
    removed = torch.zeros(3, 20, 20, dtype=torch.bool)
    removed[1] = True                      # nothing kept: no solution, filled with 0 as block_solve does
    removed[2, 5, 5] = True                # one pixel: the mean of its 8 neighbours' weighted values
    out = road.noisy_linear_impute(x, removed, noise=0.0, method="mg")
    assert torch.equal(out[0], x[0]) and (out[1] == 0).all()
    want = sum(wt * x[2, :, 5 + dr, 5 + dc] for (dr, dc), wt in road.NEIGHBOUR_WEIGHTS.items())
    assert torch.allclose(out[2, :, 5, 5], want, atol=1e-14)


def test_systems_cg_leaves_above_tolerance_are_solved_exactly():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 40, 40, generator=g, dtype=torch.float64)
    removed = _masks(40, 40, 3, 6)
    exact = road.block_solve(x, removed)
    one_step = road.mg_solve(x, removed, max_iter=1)  # one CG step: far from 1e-13, so block_solve
    m = removed.unsqueeze(1)
    assert torch.allclose(one_step[m.expand_as(x)], exact[m.expand_as(x)], atol=1e-12, rtol=0)
    assert (one_step[~m.expand_as(x)] == 0).all()
