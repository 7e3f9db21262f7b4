"""ROAD: RemOve And Debias (Rong, Leemann, Borisov, Kasneci and Kasneci, ICML 2022).

Protocol: for each fraction f in ``FRACTIONS`` (10 %..90 %), the ``int(H*W*f)`` most relevant (MoRF)
or least relevant (LeRF) pixels are removed and *imputed* by noisy linear imputation, and the model
classifies the imputed image. Per image we keep the explained class's probability and whether the
prediction still equals it, at each fraction; the per-image value is the mean probability over the
fractions (MoRF: lower is better; LeRF: higher is better). The ROAD paper and Quantus report the
accuracy at each fraction instead (`road_accuracy` gives it from the same forwards).

Noisy linear imputation (ROAD, Sec. 4.2): every removed pixel takes the weighted mean of its 8
neighbours, weight 1/6 for the 4 direct and 1/12 for the 4 diagonal ones, over the neighbours inside
the image; removed neighbours are unknowns too, so the values solve one linear system per image and
channel,

    d_i u_i - sum_{j in N(i), removed} w_ij u_j = sum_{j in N(i), kept} w_ij x_j,   d_i = sum_{j in N(i), inside} w_ij,

and then ``noise * N(0, 1)`` is added to every imputed value (noise = 0.01, in the model's normalised
input space, where ROAD's code applies it too). Public implementations build this sparse system on
the CPU and solve it per image with SciPy (`scipy_impute` is our per-image SciPy version, the
reference of the tests and of `scripts/bench_road_imputer.py`). `noisy_linear_impute` solves every
image and channel of a batch at once in torch (CPU or GPU): the matrix is symmetric and, once a
removed region touches a kept pixel, positive definite, so Jacobi-preconditioned conjugate gradients
converge; the matrix is never formed (its product is a 3 x 3 convolution restricted to the removed
pixels). `mg_solve` (the default on a GPU) preconditions them with aggregation multigrid (~20
iterations to 1e-13); `block_solve` solves the same system exactly by block-tridiagonal elimination.
A region with no kept pixel at all (every pixel removed) has no solution; we fill it with 0
(SciPy's solve reports the matrix singular).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from ...parallel import in_background, thread_map
from ._common import counter_based, degenerate, first_k_masks, fraction_counts, with_nan
from ._common import noise as draw_noise

#: widest input that "auto" imputes with `block_solve` on a CPU (SciPy above; measured crossover on
#: one thread, SciPy in symmetric mode: block 1.17 vs SciPy 1.36 ms per imputation at 32 x 32,
#: 2.11 vs 1.74 at 40 x 40, 8.4 vs 4.3 at 64 x 64)
AUTO_BLOCK_WIDTH = 32
#: the solver "auto" takes on a GPU
GPU_METHOD = "mg"
#: the removal fractions of ROAD (the paper's 10 %..90 %)
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: (row offset, column offset) -> weight of the 8 neighbours in the imputation
NEIGHBOUR_WEIGHTS = {(-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12, (0, -1): 1 / 6,
                     (0, 1): 1 / 6, (1, -1): 1 / 12, (1, 0): 1 / 6, (1, 1): 1 / 12}


def noisy_linear_impute(x: torch.Tensor, removed: torch.Tensor, noise: float = 0.01, generator=None,
                        method: str = "auto") -> torch.Tensor:
    """Impute the removed pixels of a batch: (N, C, H, W) images, (N, H, W) bool -> (N, C, H, W).

    Kept pixels are returned unchanged; removed ones get the solution of the ROAD system (module
    docstring) plus ``noise * N(0, 1)`` (drawn from ``generator`` by `_common.noise`: an `rng.Stream`
    draws on the images' device, a torch.Generator on the CPU; either way a seed gives the same noise on
    every device). method: "block" (`block_solve`: exact block-tridiagonal elimination, all
    images at once), "mg" (`mg_solve`: conjugate gradients preconditioned with multigrid, all images
    at once), "cg" (`cg_solve`), "scipy" (`scipy_impute` per image, the images spread over
    `torch.get_num_threads()` threads: SuperLU lets go of the GIL) or "auto" (`auto_method`): "mg" on
    a GPU (one H200, 72 imputations at 224 x 224 in float64: 0.14 s against 0.63 s for "block" and
    6.7 s for SciPy on the host; `scripts/bench_road_imputer.py`), on the CPU "block" for inputs up to
    `AUTO_BLOCK_WIDTH` pixels wide and "scipy" above (there a sparse LU beats both: at 112 x 112 on one
    thread ~15 ms per imputation against ~45 ms for "block" and more for "mg", whose stencil sweeps are
    memory-bound). They solve the same system and differ by rounding (~1e-14; "mg" to its tolerance,
    ~1e-13).
    """
    if method == "auto":
        method = auto_method(x)
    removed = removed.to(torch.bool)
    # on a GPU a torch.Generator's noise is drawn on the CPU while the GPU solves (the same draws as in
    # place); an `rng.Stream`'s is drawn on the GPU after the solve
    on_host = noise and x.device.type != "cpu" and not counter_based(generator)
    pending = in_background(draw_noise, x.shape, generator, device=x.device) if on_host else None
    if method == "block":
        u = block_solve(x, removed)
    elif method == "cg":
        u = cg_solve(x, removed)
    elif method == "mg":
        u = mg_solve(x, removed)
    elif method == "scipy":
        xs, ms = x.detach().cpu().double().numpy(), removed.cpu().numpy()
        solved = thread_map(lambda pair: scipy_impute(*pair), zip(xs, ms))  # SuperLU lets go of the GIL
        u = torch.from_numpy(np.stack(solved)).to(x)
    else:
        raise ValueError(f"unknown imputation method {method!r}: use auto, block, cg, mg or scipy")
    if noise:
        eps = (pending.result() if pending is not None else draw_noise(u.shape, generator, device=u.device)).to(u)
        u = u + noise * eps * removed.unsqueeze(1).to(u)
    return torch.where(removed.unsqueeze(1), u, x)


def auto_method(x: torch.Tensor) -> str:
    """The solver "auto" picks for images x: `GPU_METHOD` on a GPU; on the CPU "block" up to
    `AUTO_BLOCK_WIDTH` pixels wide, "scipy" above."""
    if x.device.type != "cpu":
        return GPU_METHOD
    return "block" if x.shape[-1] <= AUTO_BLOCK_WIDTH else "scipy"


def _neighbour_sum(t: torch.Tensor) -> torch.Tensor:
    """(..., H, W) -> (..., H, W): sum_j w_ij t_j over the in-image neighbours j of every pixel i."""
    h, w = t.shape[-2:]
    padded = torch.nn.functional.pad(t, (1, 1, 1, 1))  # 0 outside the image
    return sum(wt * padded[..., 1 + dr:1 + dr + h, 1 + dc:1 + dc + w] for (dr, dc), wt in NEIGHBOUR_WEIGHTS.items())


def _neighbour_sums(h: int, w: int, dtype, device) -> torch.Tensor:
    """(H, W): d_i, the sum of the weights of pixel i's neighbours inside the image."""
    return _neighbour_sum(torch.ones(h, w, dtype=dtype, device=device))


def block_solve(x: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """The ROAD system of every image of a batch, solved exactly by block-tridiagonal elimination.

    Unknowns are every pixel (a kept pixel's equation is ``u_i = x_i``), ordered row by row, so the
    matrix is block tridiagonal with one W x W block per image row: row r couples only with rows r-1
    and r+1, through ``-m_r * T`` (T: weight 1/6 straight above/below, 1/12 diagonally). Block
    Gaussian elimination (block Thomas): ``M_r = B_r - A_r C'_{r-1}``, ``[C'_r | d'_r] = M_r^{-1}
    [C_r | b_r - A_r d'_{r-1}]``, then ``u_r = d'_r - C'_r u_{r+1}`` from the bottom up; each step is
    one batched dense solve over the N images (channels are extra right-hand sides). The Schur
    complements of this diagonally dominant matrix stay non-singular while some pixel is kept; an
    image with every pixel removed is filled with 0 (it has no solution).
    """
    n, c, h, w = x.shape
    dtype, device = x.dtype, x.device
    out = torch.zeros_like(x)
    solvable = (~removed).flatten(1).any(1)
    if not bool(solvable.any()):
        return out
    xs, m = x[solvable], removed[solvable].to(dtype)
    k = xs.shape[0]
    d = _neighbour_sums(h, w, dtype, device)
    col = torch.arange(w, device=device)
    gap = (col.view(-1, 1) - col.view(1, -1)).abs()
    zero = torch.zeros((), dtype=dtype, device=device)
    horizontal = torch.where(gap == 1, torch.full_like(zero, 1 / 6), zero)          # same-row neighbours
    vertical = torch.where(gap == 0, torch.full_like(zero, 1 / 6),
                           torch.where(gap == 1, torch.full_like(zero, 1 / 12), zero))  # row above / below
    rhs = ((1 - m).unsqueeze(1) * xs).permute(0, 2, 3, 1)  # (K, H, W, C): x on kept pixels, 0 on removed
    uppers, sols = [], []
    upper = sol = None
    for r in range(h):
        mr = m[:, r, :].unsqueeze(-1)
        block = torch.diag_embed(m[:, r, :] * d[r] + (1 - m[:, r, :])) - mr * horizontal
        b = rhs[:, r].contiguous()
        if r:
            block = block + mr * (vertical @ upper)
            b = b + mr * (vertical @ sol)
        if r < h - 1:
            both = torch.linalg.solve(block, torch.cat([-mr * vertical, b], dim=-1))
            upper, sol = both[..., :w], both[..., w:]
        else:
            upper, sol = None, torch.linalg.solve(block, b)
        uppers.append(upper)
        sols.append(sol)
    rows = [None] * h
    rows[h - 1] = sols[h - 1]
    for r in range(h - 2, -1, -1):
        rows[r] = sols[r] - uppers[r] @ rows[r + 1]
    out[solvable] = torch.stack(rows, 1).permute(0, 3, 1, 2)
    return out


def cg_solve(x: torch.Tensor, removed: torch.Tensor, tol: float = 1e-10, max_iter: int | None = None) -> torch.Tensor:
    """The ROAD system by Jacobi-preconditioned conjugate gradients on all N*C systems at once.

    The matrix is never formed: its product is a 3 x 3 neighbour sum restricted to the removed
    pixels. Runs until every residual is below ``tol`` times its right-hand side's norm (or
    ``max_iter``, default 20 * (H + W), iterations); the iterations grow with the size of the removed
    regions; `mg_solve` preconditions the same iterations with multigrid. A region with no kept pixel stays 0.
    """
    n, c, h, w = x.shape
    dtype, device = x.dtype, x.device
    m = removed.to(dtype).unsqueeze(1)                     # (N, 1, H, W), 1 where unknown
    diag = _neighbour_sums(h, w, dtype, device)             # in-image neighbour weight sum
    inv_diag = torch.where(m > 0, 1.0 / diag, torch.zeros_like(m))
    b = _neighbour_sum(x * (1 - m)) * m                     # (N, C, H, W)

    def matvec(u):
        return (diag * u - _neighbour_sum(u)) * m

    u = torch.zeros_like(b)
    r = b.clone()
    z = r * inv_diag
    p = z.clone()
    rz = (r * z).sum(dim=(2, 3), keepdim=True)
    bnorm = b.flatten(2).norm(dim=2).view(n, c, 1, 1)
    limit = tol * torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
    for it in range(max_iter or 20 * (h + w)):
        # the convergence test synchronises a GPU: every 8th iteration is enough
        if it % 8 == 0 and bool((r.flatten(2).norm(dim=2).view(n, c, 1, 1) <= limit).all()):
            break
        ap = matvec(p)
        pap = (p * ap).sum(dim=(2, 3), keepdim=True)
        alpha = torch.where(pap > 0, rz / torch.where(pap > 0, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        u = u + alpha * p
        r = r - alpha * ap
        z = r * inv_diag
        rz_new = (r * z).sum(dim=(2, 3), keepdim=True)
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
    return u


#: the stencil's 9 offsets in row-major order (index 4 is the centre); `mg_solve`'s coefficient tensors
#: hold one (H, W) plane per offset
_OFFSETS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]


def _stencil_product(coef: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(S, 9, H, W) coefficients, (S, C, H, W) -> (S, C, H, W): sum_k coef_k(i) u(i + offset_k), 0 outside.

    The 9 shifted copies of u are one strided view of u padded by a pixel (no copy), so the product is
    a few kernels whatever the grid (the coarse levels of `_Multigrid` are bound by launches on a GPU).
    """
    s, c, h, w = u.shape
    padded = torch.nn.functional.pad(u, (1, 1, 1, 1))
    st = padded.stride()
    shifted = padded.as_strided((s, c, 3, 3, h, w), (st[0], st[1], st[2], st[3], st[2], st[3]))
    return (coef.view(s, 1, 3, 3, h, w) * shifted).sum((2, 3))


def _coarsen(coef: torch.Tensor) -> torch.Tensor:
    """Galerkin coarse operator P^T A P of a 9-point operator, P: 2 x 2 aggregation -> (S, 9, ceil(H/2), ceil(W/2)).

    Entry (I, J) of P^T A P sums A_ij over the fine pixels i of cell I and j of cell J. A fine pixel at
    position (p, q) in its cell couples through offset (dr, dc) with the cell ((p + dr) // 2, (q + dc) // 2)
    away, so the coarse operator is 9-point too. An odd side is padded with empty (all-zero) pixels.
    """
    s, _, h, w = coef.shape
    coef = torch.nn.functional.pad(coef, (0, w % 2, 0, h % 2))
    out = coef.new_zeros(s, 9, (h + 1) // 2, (w + 1) // 2)
    for k, (dr, dc) in enumerate(_OFFSETS):
        for p in (0, 1):
            for q in (0, 1):
                kk = 3 * ((p + dr) // 2 + 1) + (q + dc) // 2 + 1
                out[:, kk] += coef[:, k, p::2, q::2]
    return out


def _restrict(r: torch.Tensor) -> torch.Tensor:
    """P^T r: the sum over each 2 x 2 cell (odd sides padded with 0)."""
    h, w = r.shape[-2:]
    r = torch.nn.functional.pad(r, (0, w % 2, 0, h % 2))
    return r.unflatten(-1, (-1, 2)).unflatten(-3, (-1, 2)).sum((-3, -1))


def _prolong(e: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """P e: each cell's value copied to its 2 x 2 pixels, cut to H x W."""
    hc, wc = e.shape[-2:]
    return e[..., :, None, :, None].expand(*e.shape[:-2], hc, 2, wc, 2).reshape(*e.shape[:-2], 2 * hc, 2 * wc)[..., :h, :w]


class _Multigrid:
    """One multigrid cycle for the ROAD operators of S systems: the preconditioner of `mg_solve`.

    Levels: the fine operator (`_fine_product`), then Galerkin operators of 2 x 2 aggregates
    (`_coarsen`, unsmoothed aggregation) down to at most `COARSEST` cells, where the systems are solved
    densely (their inverses, formed once). Smoother: one damped Jacobi sweep (weight `OMEGA`) before and one after
    the coarse correction; the correction is scaled by `ALPHA` (piecewise-constant prolongation
    under-corrects smooth errors; a scalar keeps the cycle symmetric) and the `W_LEVELS` finest levels
    visit the next coarser level twice (a W-cycle there, a V-cycle below). Symmetric smoothing, exact
    coarsest solve and ALPHA < 2 make the cycle a symmetric positive definite preconditioner.
    Iterations of `mg_solve` to 1e-13 (MoRF and LeRF, 9 fractions, smooth random maps, float64): 21 at
    112 x 112 and 25 at 224 x 224; a plain V-cycle takes 29 and 33 (ALPHA = 1: 49), a W-cycle on the two
    finest levels 17 and 21 but more launches on a GPU (one H200, 144 imputations at 112 x 112: 90 ms
    against 67 ms with W_LEVELS = 1; 72 at 224 x 224: 137 against 141 ms). Pixels and cells with no
    unknown (diagonal 0) stay 0.
    """

    COARSEST = 256
    OMEGA = 0.8
    ALPHA = 1.5
    W_LEVELS = 1

    def __init__(self, removed: torch.Tensor, dtype):
        s, h, w = removed.shape
        m = removed.to(dtype).unsqueeze(1)
        d = _neighbour_sums(h, w, dtype, removed.device)
        self.fine = (m, d + 1 / 3)
        self.levels = [(None, m / d)]  # level 0's product is `_fine_product`
        coef = road_operator(removed, dtype)
        while coef.shape[-2] * coef.shape[-1] > self.COARSEST:
            coef = _coarsen(coef)
            diag = coef[:, 4:5]
            active = diag > 0
            self.levels.append((coef, torch.where(active, 1.0 / torch.where(active, diag, torch.ones_like(diag)), 0 * diag)))
        # the coarsest level as dense matrices; an empty cell's row and column are the identity's
        h, w = coef.shape[-2:]
        n = h * w
        dense = coef.new_zeros(s, n, n)
        idx = torch.arange(n, device=coef.device).view(h, w)
        for k, (dr, dc) in enumerate(_OFFSETS):
            rows = idx[max(0, -dr):h - max(0, dr), max(0, -dc):w - max(0, dc)]
            dense[:, rows.reshape(-1), (rows + dr * w + dc).reshape(-1)] = \
                coef[:, k, max(0, -dr):h - max(0, dr), max(0, -dc):w - max(0, dc)].reshape(s, -1)
        dense = dense + torch.diag_embed((coef[:, 4] <= 0).reshape(s, n).to(dtype))
        self.coarse_inverse = torch.linalg.inv(dense)  # applied by one batched product per visit

    def product(self, u: torch.Tensor, level: int = 0) -> torch.Tensor:
        """The operator of `level` applied to u (S, C, h, w)."""
        if level == 0:
            return _fine_product(*self.fine, u)
        return _stencil_product(self.levels[level][0], u)

    def __call__(self, r: torch.Tensor, level: int = 0) -> torch.Tensor:
        if level == len(self.levels) - 1:  # the coarsest level: its dense solve
            s, c, h, w = r.shape
            return (r.reshape(s, c, h * w) @ self.coarse_inverse.transpose(1, 2)).reshape(s, c, h, w)
        inv = self.levels[level][1]
        h, w = r.shape[-2:]
        u = self.OMEGA * inv * r
        rc = _restrict(r - self.product(u, level))
        coarse = self(rc, level + 1)
        if level < self.W_LEVELS and level + 2 < len(self.levels):
            coarse = coarse + self(rc - self.product(coarse, level + 1), level + 1)
        u = u + self.ALPHA * _prolong(coarse, h, w) * (inv > 0)
        return u + self.OMEGA * inv * (r - self.product(u, level))


def _fine_product(m: torch.Tensor, centre: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The ROAD operator applied to u (zero on kept pixels): m * (d u - sum_j w_ij u_j), the neighbour sum
    separable: [[1, 2, 1], [2, 4, 2], [1, 2, 1]] / 12 minus the centre's 4/12 (``centre`` = d + 1/3)."""
    h, w = u.shape[-2:]
    p = torch.nn.functional.pad(u, (1, 1, 0, 0))
    rows = p[..., :, :w] + 2 * u + p[..., :, 2:]
    p = torch.nn.functional.pad(rows, (0, 0, 1, 1))
    return m * (centre * u - (p[..., :h, :] + 2 * rows + p[..., 2:, :]) / 12)


def road_operator(removed: torch.Tensor, dtype) -> torch.Tensor:
    """(S, H, W) bool -> (S, 9, H, W): the ROAD matrix of each mask as per-pixel stencil coefficients.

    Row i (a removed pixel): d_i on the centre, -w_ij for each removed in-image neighbour j; rows and
    columns of kept pixels are 0.
    """
    s, h, w = removed.shape
    m = removed.to(dtype)
    mp = torch.nn.functional.pad(m, (1, 1, 1, 1))  # 0 outside the image: no coupling there
    coef = m.new_zeros(s, 9, h, w)
    coef[:, 4] = m * _neighbour_sums(h, w, dtype, removed.device)
    for k, (dr, dc) in enumerate(_OFFSETS):
        if k != 4:
            coef[:, k] = -NEIGHBOUR_WEIGHTS[(dr, dc)] * m * mp[:, 1 + dr:1 + dr + h, 1 + dc:1 + dc + w]
    return coef


def mg_solve(x: torch.Tensor, removed: torch.Tensor, tol: float | None = None, max_iter: int = 200) -> torch.Tensor:
    """The ROAD system of every image of a batch by conjugate gradients preconditioned with multigrid.

    All N systems (channels: extra right-hand sides) iterate at once; the matrix is never formed (its
    product is a 9-point stencil on the pixel grid), the preconditioner is one `_Multigrid` cycle. Runs until every residual is below
    ``tol`` times its right-hand side's norm (default 1e-13 in float64, 1e-6 in float32; checked every
    4th iteration) or ``max_iter`` iterations: 21 iterations at 112 x 112 and 25 at 224 x 224 in
    float64 (`_Multigrid`), the imputed images within 2e-13 of SciPy's sparse LU; a system still above
    its tolerance then is solved by `block_solve`. An image with every pixel removed is filled with 0
    (no solution), as `block_solve` does.
    """
    if tol is None:
        tol = 1e-13 if x.dtype == torch.float64 else 1e-6
    n, c, h, w = x.shape
    out = torch.zeros_like(x)
    solvable = (~removed).flatten(1).any(1)
    if not bool(solvable.any()):
        return out
    xs, rem = x[solvable], removed[solvable]
    m = rem.to(x.dtype).unsqueeze(1)
    b = _neighbour_sum(xs * (1 - m)) * m  # right-hand side: the kept neighbours' weighted values
    precondition = _Multigrid(rem, x.dtype)
    u = torch.zeros_like(b)
    r = b.clone()
    z = precondition(r)
    p = z
    rz = (r * z).sum(dim=(2, 3), keepdim=True)
    bnorm = b.flatten(2).norm(dim=2)
    limit = tol * torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))  # (S, C)

    def converged():
        return r.flatten(2).norm(dim=2) <= limit
    one = torch.ones_like(rz)
    for it in range(max_iter):
        if it % 4 == 0 and bool(converged().all()):
            break
        ap = precondition.product(p)
        pap = (p * ap).sum(dim=(2, 3), keepdim=True)
        alpha = torch.where(pap > 0, rz / torch.where(pap > 0, pap, one), 0 * one)
        u = u + alpha * p
        r = r - alpha * ap
        z = precondition(r)
        rz_new = (r * z).sum(dim=(2, 3), keepdim=True)
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, one), 0 * one)
        p = z + beta * p
        rz = rz_new
    # a system not brought under its tolerance in max_iter iterations (not seen on any mask we tried:
    # ROAD's, one kept pixel, a checkerboard, stripes) is solved exactly instead
    stuck = ~converged().all(1)
    if bool(stuck.any()):
        u[stuck] = block_solve(xs[stuck], rem[stuck]) * m[stuck]
    out[solvable] = u
    return out


#: the 3 x 3 stencil in row-major order (flat index increasing): each matrix row's columns come out sorted
_STENCIL = sorted([*NEIGHBOUR_WEIGHTS, (0, 0)])
#: SuperLU's panel size (columns factored together); the default (10) is tuned for wider supernodes than
#: this 2-D 9-point system has: 2 is 1.2-1.3x faster at 224 x 224 (measured in two runs: 80-83 vs
#: 104-106 ms per imputation with the matrix assembly below, one thread)
SUPERLU_PANEL_SIZE = 2


@functools.lru_cache(maxsize=16)
def _padded_grid(h: int, w: int):
    """The pieces of `scipy_impute`'s assembly that depend on the image size alone, on the image padded
    by one pixel on every side: the flat offsets of `_STENCIL`'s 9 entries, d_i (`_neighbour_sums`,
    flattened), and the padded index of every pixel."""
    offsets = np.array([dr * (w + 2) + dc for dr, dc in _STENCIL], dtype=np.int64)
    rows, cols = np.divmod(np.arange(h * w), w)
    d = _neighbour_sums(h, w, torch.float64, "cpu").numpy().reshape(-1)
    return offsets, d, (rows + 1) * (w + 2) + cols + 1


def scipy_impute(x: np.ndarray, removed: np.ndarray, noise: float = 0.0, rng=None) -> np.ndarray:
    """The same imputation for one image, (C, H, W) and (H, W) bool, with a sparse SciPy solve.

    The reference implementation (one system per image, all channels as right-hand sides, as
    ROAD's public code does), for the tests and the benchmark script.
    """
    from scipy.sparse import csc_matrix
    from scipy.sparse.linalg import splu

    c, h, w = x.shape
    gone = np.asarray(removed, dtype=bool).reshape(-1)
    idx = np.flatnonzero(gone)
    flat = np.array(x, dtype=np.float64, copy=True).reshape(c, -1)
    if idx.size == 0:
        return flat.reshape(c, h, w)
    if idx.size == h * w:  # nothing kept: no solution; filled with 0 as `block_solve` does
        return np.zeros((c, h, w))
    n = idx.size
    offsets, d, inner = _padded_grid(h, w)
    # on the image padded by one pixel: pixel -> unknown number (increasing with the pixel), -1 for a
    # kept pixel or outside; x on kept pixels, 0 on removed ones and outside
    var = np.full((h + 2) * (w + 2), -1, dtype=np.int64)
    at = inner[idx]
    var[at] = np.arange(n)
    known = np.zeros((c, (h + 2) * (w + 2)))
    known[:, inner] = flat
    known[:, at] = 0.0
    # row i of the matrix, one stencil entry per column of these (n, 9) arrays; the matrix is
    # symmetric, so its rows assembled as CSR are its CSC columns
    columns = var[at[:, None] + offsets]      # the neighbour's unknown number, -1 if it is none
    present = columns >= 0
    values = np.empty((n, 9))
    rhs = np.zeros((c, n))
    for k, (dr, dc) in enumerate(_STENCIL):
        if (dr, dc) == (0, 0):
            values[:, k] = d[idx]
            continue
        wt = NEIGHBOUR_WEIGHTS[(dr, dc)]
        values[:, k] = -wt
        rhs += wt * known[:, at + offsets[k]]  # kept neighbours: known values
    indptr = np.concatenate([[0], np.cumsum(present.sum(1))])
    a = csc_matrix((values[present], columns[present], indptr), shape=(n, n))
    # the matrix is symmetric positive definite (see the module's docstring): SuperLU in its symmetric
    # mode (minimum-degree ordering of A + Aᵀ, diagonal pivots) factors it without pivoting, 1.5x
    # faster than `spsolve`'s default column ordering at 112 x 112 (13.8 vs 20.8 ms, same values to 7e-15)
    lu = splu(a, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, panel_size=SUPERLU_PANEL_SIZE,
              options={"SymmetricMode": True})
    flat[:, idx] = lu.solve(rhs.T).T
    if noise:
        flat[:, idx] += noise * (rng or np.random.default_rng()).standard_normal((c, n))
    return flat.reshape(c, h, w)


def road_masks(maps: torch.Tensor, fractions=FRACTIONS, most_first: bool = True) -> torch.Tensor:
    """(B, H, W) -> (B, F, H, W) bool: the pixels removed at each fraction (MoRF or LeRF order)."""
    h, w = maps.shape[-2:]
    return first_k_masks(maps, fraction_counts(h * w, fractions), most_first)


def road_inputs(x: torch.Tensor, maps: torch.Tensor, fractions=FRACTIONS, most_first: bool = True,
                noise: float = 0.01, generator=None, method: str = "auto") -> torch.Tensor:
    """(B, C, H, W), (B, H, W) -> (B, F, C, H, W) imputed copies, one per fraction, solved in one batch."""
    b, c, h, w = x.shape
    masks = road_masks(maps, fractions, most_first)
    f = masks.shape[1]
    xs = x.unsqueeze(1).expand(b, f, c, h, w).reshape(b * f, c, h, w)
    if isinstance(generator, (list, tuple)):  # one generator per image: its F copies draw from it in turn
        generator = [g for g in generator for _ in range(f)]
    return noisy_linear_impute(xs, masks.reshape(b * f, h, w), noise, generator, method).reshape(b, f, c, h, w)


def road(probs, maps) -> np.ndarray:
    """(B, F) probabilities of the explained class -> (B,) their mean over the fractions; NaN for a constant map."""
    return with_nan(np.asarray(probs, dtype=np.float64).mean(-1), degenerate(maps))


def road_accuracy(hits) -> np.ndarray:
    """(B, F) bools (prediction still the explained class) -> (F,) accuracy per fraction (the paper's curve)."""
    return np.asarray(hits, dtype=np.float64).mean(0)
