"""The metric suite's pure functions against hand-worked examples and brute-force loops.

Every expected number is derived in the comment above its assertion; the brute-force loops are
written independently of the batched code (plain Python over pixels, pairs or images).
"""
import math

import numpy as np
import pytest
import torch

from transexplain.evaluation.metrics import METRICS, curves, localisation, road, robustness, saco, sanity
from transexplain.evaluation.metrics._common import nan_summary, removal_rank, step_counts


# ---------------------------------------------------------------- curves

def test_curve_numbers_by_hand():
    morf = np.array([[1.0, 0.5, 0.0]])
    lerf = np.array([[1.0, 1.0, 1.0]])
    maps = np.array([[[0.0, 1.0]]])
    # trapezoid on x = 0, 1/2, 1: (1/2) * ((1 + 0.5)/2 + (0.5 + 0)/2) = 0.5
    assert curves.curve_auc(morf)[0] == pytest.approx(0.5, abs=1e-15)
    assert curves.deletion(morf, maps)[0] == pytest.approx(0.5, abs=1e-15)
    # AOPC: mean of p_0 - p_k over k = 0, 1, 2: (0 + 0.5 + 1) / 3 = 0.5
    assert curves.aopc(morf, maps)[0] == pytest.approx(0.5, abs=1e-15)
    # ABPC: mean of lerf_k - morf_k: (0 + 0.5 + 1) / 3 = 0.5
    assert curves.abpc(lerf, morf, maps)[0] == pytest.approx(0.5, abs=1e-15)
    # SRG = AUC(LIF) - AUC(MIF) = 1 - 0.5
    assert curves.srg(morf, lerf, maps)[0] == pytest.approx(0.5, abs=1e-15)


def test_constant_map_gives_nan_and_is_counted():
    maps = np.array([[[0.3, 0.3]], [[0.0, 1.0]]])
    probs = np.array([[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]])
    values = curves.deletion(probs, maps)
    assert math.isnan(values[0]) and values[1] == pytest.approx(0.5)
    # the summary averages the finite values only and says how many were NaN
    assert nan_summary(values) == {"mean": 0.5, "n": 1, "nan": 1}


def test_step_counts_and_order():
    # floor(10 k / 4), k = 0..4: 0, 2, 5, 7, 10
    assert step_counts(10, 4) == [0, 2, 5, 7, 10]
    # map [[4, 3], [3, 1]]: most first -> flat 0 (4), then the tie 1, 2 by index, then 3
    m = torch.tensor([[[4.0, 3.0], [3.0, 1.0]]])
    assert removal_rank(m, True).flatten().tolist() == [0, 1, 2, 3]
    # least first: flat 3 (1), then the tie 1, 2 by index, then 0
    assert removal_rank(m, False).flatten().tolist() == [3, 1, 2, 0]


def test_deletion_and_insertion_inputs_by_hand():
    x = torch.arange(4, dtype=torch.float64).view(1, 1, 2, 2) + 10   # pixels 10, 11, 12, 13
    maps = torch.tensor([[[1.0, 4.0], [3.0, 2.0]]])                # order: flat 1, 2, 3, 0
    out = curves.deletion_inputs(x, maps, torch.zeros(1, 1, 1), steps=2)  # 0, 2, 4 pixels removed
    assert out.shape == (1, 3, 1, 2, 2)
    assert out[0, 0, 0].flatten().tolist() == [10, 11, 12, 13]
    assert out[0, 1, 0].flatten().tolist() == [10, 0, 0, 13]       # flat 1 and 2 removed
    assert out[0, 2, 0].flatten().tolist() == [0, 0, 0, 0]
    blurred = torch.full_like(x, -1.0)
    ins = curves.insertion_inputs(x, maps, blurred, steps=2)
    assert ins[0, 0, 0].flatten().tolist() == [-1, -1, -1, -1]
    assert ins[0, 1, 0].flatten().tolist() == [-1, 11, 12, -1]
    assert ins[0, 2, 0].flatten().tolist() == [10, 11, 12, 13]


def test_gaussian_blur_against_a_loop():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 9, 7, generator=g, dtype=torch.float64)
    size, sigma = 5, 1.5
    t = np.arange(size) - size // 2
    k1 = np.exp(-t ** 2 / (2 * sigma ** 2))
    k2 = np.outer(k1, k1) / k1.sum() ** 2
    xn = x.numpy()
    want = np.zeros_like(xn)
    for b in range(2):
        for c in range(3):
            for i in range(9):
                for j in range(7):
                    s = 0.0
                    for di in range(size):
                        for dj in range(size):
                            ii, jj = i + di - size // 2, j + dj - size // 2
                            if 0 <= ii < 9 and 0 <= jj < 7:  # zero padding
                                s += k2[di, dj] * xn[b, c, ii, jj]
                    want[b, c, i, j] = s
    assert np.abs(curves.gaussian_blur(x, size, sigma).numpy() - want).max() < 1e-13


# ---------------------------------------------------------------- ROAD

def test_imputation_by_hand():
    # 1 x 3 image [1, ?, 4]: the middle pixel's in-image neighbours are left and right (1/6 each),
    # so u = (1/6 * 1 + 1/6 * 4) / (2/6) = 2.5
    x = torch.tensor([[[[1.0, 0.0, 4.0]]]], dtype=torch.float64)
    removed = torch.tensor([[[False, True, False]]])
    for method in ("block", "cg", "mg", "scipy"):
        out = road.noisy_linear_impute(x, removed, noise=0.0, method=method)
        assert out[0, 0, 0].tolist() == pytest.approx([1.0, 2.5, 4.0], abs=1e-12), method
    # 3 x 3, the corner (0, 0) removed: neighbours (0,1) 1/6, (1,0) 1/6, (1,1) 1/12, d = 5/12,
    # u = (x01/6 + x10/6 + x11/12) / (5/12) = (2 x01 + 2 x10 + x11) / 5 = (2*2 + 2*4 + 5) / 5 = 3.4
    x = torch.arange(1, 10, dtype=torch.float64).view(1, 1, 3, 3)
    removed = torch.zeros(1, 3, 3, dtype=torch.bool)
    removed[0, 0, 0] = True
    for method in ("block", "cg", "mg", "scipy"):
        out = road.noisy_linear_impute(x, removed, noise=0.0, method=method)
        assert out[0, 0, 0, 0].item() == pytest.approx(3.4, abs=1e-12), method
        assert out[0, 0].flatten()[1:].tolist() == list(range(2, 10))


def _loop_impute(x, removed):
    """Dense brute force: one equation per removed pixel, numpy.linalg.solve."""
    c, h, w = x.shape
    idx = [(i, j) for i in range(h) for j in range(w) if removed[i, j]]
    pos = {p: n for n, p in enumerate(idx)}
    a = np.zeros((len(idx), len(idx)))
    b = np.zeros((len(idx), c))
    for n, (i, j) in enumerate(idx):
        for (di, dj), wt in road.NEIGHBOUR_WEIGHTS.items():
            ii, jj = i + di, j + dj
            if not (0 <= ii < h and 0 <= jj < w):
                continue
            a[n, n] += wt
            if removed[ii, jj]:
                a[n, pos[(ii, jj)]] -= wt
            else:
                b[n] += wt * x[:, ii, jj]
    out = x.copy()
    sol = np.linalg.solve(a, b)
    for n, (i, j) in enumerate(idx):
        out[:, i, j] = sol[n]
    return out


def test_batched_imputation_against_a_dense_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 2, 7, 9, generator=g, dtype=torch.float64)
    maps = torch.rand(5, 7, 9, generator=g, dtype=torch.float64)
    removed = torch.stack([road.road_masks(maps[i:i + 1], fractions=(f,))[0, 0] for i, f in
                           enumerate((0.2, 0.5, 0.9, 0.9, 0.7))])
    want = np.stack([_loop_impute(x[i].numpy(), removed[i].numpy()) for i in range(5)])
    for method in ("block", "cg", "mg", "scipy"):
        got = road.noisy_linear_impute(x, removed, noise=0.0, method=method).numpy()
        assert np.abs(got - want).max() < (1e-12 if method != "cg" else 1e-8), method


def test_imputation_noise_only_on_removed_pixels():
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    removed = torch.zeros(1, 4, 4, dtype=torch.bool)
    removed[0, 1:3, 1:3] = True
    out = road.noisy_linear_impute(x, removed, noise=0.5, generator=torch.Generator().manual_seed(3), method="block")
    assert (out[0, 0][~removed[0]] == 0).all()
    assert (out[0, 0][removed[0]] != 0).all()


def test_noise_from_generators_drawn_in_threads_equals_a_serial_loop():
    # one generator per image, shared by its copies (ROAD's fractions) and interleaved: each copy must
    # get what a plain loop drawing from that generator in batch order gives, whatever the threads
    from transexplain.evaluation.metrics._common import noise

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for kind, draw in (("randn", torch.randn), ("rand", torch.rand)):
            def gens():
                g = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
                return [g[0], g[1], g[0], g[2], g[1], g[0], g[2]]
            want = torch.stack([draw((3, 4, 5), generator=g, dtype=torch.float64) for g in gens()])
            got = noise((7, 3, 4, 5), gens(), kind)
            assert got.dtype == torch.float64 and torch.equal(got, want), kind
    finally:
        torch.set_num_threads(threads)


def test_noise_drawn_in_the_background_equals_in_place():
    from transexplain.evaluation.metrics._common import noise
    from transexplain.parallel import in_background

    def gens():
        return [g for g in (torch.Generator().manual_seed(s) for s in (4, 5)) for _ in range(3)]
    want = noise((6, 2, 3, 3), gens())
    assert torch.equal(in_background(noise, (6, 2, 3, 3), gens()).result(), want)


def test_road_value_and_accuracy():
    probs = np.array([[0.9, 0.5, 0.1], [0.2, 0.2, 0.2]])
    maps = np.array([[[0.0, 1.0]], [[0.0, 2.0]]])
    # means: (0.9 + 0.5 + 0.1) / 3 = 0.5, 0.2
    assert road.road(probs, maps).tolist() == pytest.approx([0.5, 0.2])
    assert road.road_accuracy([[1, 0, 0], [1, 1, 0]]).tolist() == [1.0, 0.5, 0.0]


# ---------------------------------------------------------------- SaCo

def test_saco_by_hand():
    # s = (3, 2, 1), Δ = (0.5, 0.1, 0.3) from p(x) = 1, perturbed (0.5, 0.9, 0.7)
    # pairs: (1,2) w=1, Δ1 >= Δ2 -> +1; (1,3) w=2, Δ1 >= Δ3 -> +2; (2,3) w=1, Δ2 < Δ3 -> -1
    # F = (1 + 2 - 1) / (1 + 2 + 1) = 0.5
    f = saco.saco([[3.0, 2.0, 1.0]], [1.0], [[0.5, 0.9, 0.7]])
    assert f[0] == pytest.approx(0.5, abs=1e-15)
    # equal group sums: every weight 0 -> 0/0 -> NaN
    assert math.isnan(saco.saco([[1.0, 1.0, 1.0]], [1.0], [[0.5, 0.9, 0.7]])[0])


def test_saco_groups_by_hand():
    # N = 10, K = 3: boundaries floor(10 k / 3) = 0, 3, 6, 10 -> sizes 3, 3, 4
    maps = torch.arange(10, dtype=torch.float64).view(1, 2, 5)
    g = saco.saco_groups(maps, 3)
    assert g.flatten(2).sum(-1).tolist() == [[3, 3, 4]]
    # the most salient group holds values 9, 8, 7
    assert sorted(maps[0][g[0, 0]].tolist()) == [7.0, 8.0, 9.0]
    assert group_sum(maps, g) == [24.0, 15.0, 6.0]


def group_sum(maps, g):
    return saco.group_salience(maps, g)[0].tolist()


def test_saco_against_the_paper_loop():
    rng = np.random.default_rng(0)
    s = rng.random((20, 10))
    s = -np.sort(-s, axis=1)
    p0 = rng.random(20)
    pp = rng.random((20, 10))
    got = saco.saco(s, p0, pp)
    want = [saco.saco_loop(s[i], p0[i], pp[i]) for i in range(20)]
    assert np.abs(got - np.array(want)).max() < 1e-14


def test_saco_inputs_replace_one_group_by_the_mean():
    x = torch.arange(4, dtype=torch.float64).view(1, 1, 2, 2)            # mean 1.5
    maps = torch.tensor([[[4.0, 3.0], [2.0, 1.0]]])
    out = saco.saco_inputs(x, saco.saco_groups(maps, 2))
    assert out[0, 0, 0].flatten().tolist() == [1.5, 1.5, 2, 3]
    assert out[0, 1, 0].flatten().tolist() == [0, 1, 1.5, 1.5]


# ---------------------------------------------------------------- localisation

def test_localisation_by_hand():
    maps = np.array([[[0.9, 0.1], [0.5, 0.2]]])
    masks = np.array([[[0, 0], [1, 1]]])
    # the maximum 0.9 sits at (0, 0), outside the object: a miss
    assert localisation.pointing_game(maps, masks).tolist() == [0.0]
    # with a tolerance of one pixel (0, 0) touches the object: a hit
    assert localisation.pointing_game(maps, masks, tolerance=1).tolist() == [1.0]
    # mass: (0.5 + 0.2) / (0.9 + 0.1 + 0.5 + 0.2) = 0.7 / 1.7 = 7/17
    assert localisation.relevance_mass_accuracy(maps, masks)[0] == pytest.approx(7 / 17, abs=1e-15)
    # rank: K = 2, the top two are 0.9 (outside) and 0.5 (inside): 1/2
    assert localisation.relevance_rank_accuracy(maps, masks)[0] == pytest.approx(0.5, abs=1e-15)


def test_localisation_ties_negative_values_and_nan():
    # two equal maxima, one on the object: a hit
    assert localisation.pointing_game([[[1.0, 1.0, 0.0]]], [[[0, 1, 0]]]).tolist() == [1.0]
    # negative relevance does not count: R+ = (0, 2, 0), inside = 2 -> 1.0
    assert localisation.relevance_mass_accuracy([[[-1.0, 2.0, -3.0]]], [[[0, 1, 0]]])[0] == 1.0
    # rank ties: values (1, 1, 0), K = 1: the tie goes to the lower index (outside): 0
    assert localisation.relevance_rank_accuracy([[[1.0, 1.0, 0.0]]], [[[0, 1, 0]]])[0] == 0.0
    for fn in (localisation.pointing_game, localisation.relevance_mass_accuracy, localisation.relevance_rank_accuracy):
        assert math.isnan(fn([[[0.2, 0.7]]], [[[0, 0]]])[0])          # empty mask
        assert math.isnan(fn([[[0.5, 0.5]]], [[[0, 1]]])[0])          # constant map


def test_localisation_against_loops():
    rng = np.random.default_rng(2)
    maps = rng.random((6, 5, 4))
    masks = rng.random((6, 5, 4)) < 0.3
    pg = localisation.pointing_game(maps, masks)
    rma = localisation.relevance_mass_accuracy(maps, masks)
    rra = localisation.relevance_rank_accuracy(maps, masks)
    for i in range(6):
        flat, m = maps[i].reshape(-1), masks[i].reshape(-1)
        best = max(range(flat.size), key=lambda p: flat[p])
        assert pg[i] == float(m[best])
        assert rma[i] == pytest.approx(sum(flat[p] for p in range(flat.size) if m[p]) / sum(flat), abs=1e-14)
        k = int(m.sum())
        top = sorted(range(flat.size), key=lambda p: (-flat[p], p))[:k]
        assert rra[i] == pytest.approx(sum(m[p] for p in top) / k, abs=1e-15)


# ---------------------------------------------------------------- infidelity, max-sensitivity

def test_infidelity_by_hand():
    maps = np.array([[[2.0]]])                              # one pixel, Φ = 2
    pert = np.array([[[[[1.0]]], [[[-1.0]]]]])              # (B=1, S=2, C=1, 1, 1): I = 1, -1
    # I·Φ = (2, -2); Δf = (1, -3): ((2 - 1)^2 + (-2 + 3)^2) / 2 = 1
    assert robustness.infidelity(maps, pert, [1.0], [[0.0, 4.0]], normalize=False)[0] == pytest.approx(1.0)
    # normalised: β = mean(IΦ Δf) / mean((IΦ)^2) = ((2 + 6) / 2) / ((4 + 4) / 2) = 1 -> still 1
    assert robustness.infidelity(maps, pert, [1.0], [[0.0, 4.0]], normalize=True)[0] == pytest.approx(1.0)
    # Δf = (1, -1): β = ((2 + 2)/2) / 4 = 1/2, β IΦ = (1, -1) = Δf -> 0 (without β: ((2-1)^2 + (-2+1)^2)/2 = 1)
    assert robustness.infidelity(maps, pert, [1.0], [[0.0, 2.0]], normalize=True)[0] == pytest.approx(0.0, abs=1e-15)
    assert robustness.infidelity(maps, pert, [1.0], [[0.0, 2.0]], normalize=False)[0] == pytest.approx(1.0)


def test_max_sensitivity_by_hand():
    maps = np.array([[[3.0, 4.0]]])                         # ||Φ|| = 5
    perturbed = np.array([[[[3.0, 4.0]], [[0.0, 4.0]], [[3.0, 0.0]]]])
    # distances 0, 3, 4 -> max 4 / 5 = 0.8
    assert robustness.max_sensitivity(maps, perturbed)[0] == pytest.approx(0.8, abs=1e-15)


# ---------------------------------------------------------------- randomisation

def test_max_sensitivity_explains_the_copies_a_batch_at_a_time():
    """The S perturbed copies of each image go through the explainer at most the run's batch size at a
    time, in order, and give what one call on every copy gives (a real explainer, rollout and attnlrp
    on the tiny ViT: each map depends on its own input only)."""
    from conftest import make_vit
    from transexplain import explain
    from transexplain.evaluation.suite import explain_in_batches

    vit = make_vit()
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(7, 3, 16, 16, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    for method in ("rollout", "attnlrp"):
        seen = []

        def fn(model, x, t, method=method):
            seen.append(len(x))
            return explain(model, x, method=method, target=t).heatmap.detach()
        whole = fn(vit, xs, targets)
        seen.clear()
        chunked = explain_in_batches(fn, vit, xs, targets, 3)
        assert seen == [3, 3, 1]
        assert (chunked - whole).abs().max().item() < 1e-12


def test_average_ranks_equal_scipy_rankdata():
    from scipy.stats import rankdata

    g = torch.Generator().manual_seed(7)
    v = torch.randint(0, 6, (5, 40), generator=g).to(torch.float64)  # many ties
    v[1] = 3.0                                                        # one run over the whole row
    v[2] = torch.randn(40, generator=g, dtype=torch.float64)          # no tie
    got = sanity.average_ranks(v)
    assert torch.equal(got, torch.from_numpy(rankdata(v.numpy(), axis=-1, method="average")))
    # by hand: [2, 1, 2, 5] -> 1 is first; the two 2s share ranks 2 and 3; 5 is fourth
    assert sanity.average_ranks(torch.tensor([[2.0, 1.0, 2.0, 5.0]])).tolist() == [[2.5, 1.0, 2.5, 4.0]]


def test_spearman_of_a_map_holding_nan_is_nan():
    g = torch.Generator().manual_seed(8)
    maps = torch.rand(3, 4, 4, generator=g, dtype=torch.float64)
    other = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64)
    maps[1, 2, 2] = float("nan")
    other[0, 2, 0, 1] = float("nan")
    rho = sanity.spearman(maps, other)
    assert np.isnan(rho[:, 1]).all() and np.isnan(rho[0, 2]) and not np.isnan(rho[1, 2]) and not np.isnan(rho[:, 0]).any()


def test_spearman_by_hand_and_against_scipy():
    from scipy.stats import spearmanr

    a = np.array([[[1.0, 2.0, 3.0, 4.0]]])
    # reversed order: ρ = -1
    assert sanity.spearman(a, a[:, :, ::-1])[0] == pytest.approx(-1.0)
    rng = np.random.default_rng(4)
    maps = rng.integers(0, 4, (5, 3, 3)).astype(float)      # many ties
    other = rng.integers(0, 4, (2, 5, 3, 3)).astype(float)
    rho = sanity.spearman(maps, other)
    for layer in range(2):
        for i in range(5):
            want = spearmanr(maps[i].reshape(-1), other[layer, i].reshape(-1)).statistic
            assert rho[layer, i] == pytest.approx(want, abs=1e-14) or (math.isnan(want) and math.isnan(rho[layer, i]))
    assert math.isnan(sanity.spearman(np.ones((1, 2, 2)), a.reshape(1, 2, 2))[0])
    mean, per_layer = sanity.randomisation(maps, other)
    assert per_layer.shape == (5, 2) and mean == pytest.approx(per_layer.mean(1), nan_ok=True)


def test_every_metric_is_registered_with_a_direction():
    assert {"insertion", "deletion", "road_morf", "saco", "pointing_game", "randomisation"} <= set(METRICS)
    assert [m for m, s in METRICS.items() if s.needs_masks] == ["pointing_game", "relevance_mass", "relevance_rank"]
