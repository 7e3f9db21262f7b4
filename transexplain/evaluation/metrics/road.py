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
pixels). `block_solve` (the default) solves the same system exactly by block-tridiagonal elimination.
A region with no kept pixel at all (every pixel removed) has no solution; we fill it with 0
(SciPy's solve reports the matrix singular).
"""
from __future__ import annotations

import numpy as np
import torch

from ._common import degenerate, first_k_masks, fraction_counts, with_nan
from ._common import noise as draw_noise

#: widest input that "auto" imputes with `block_solve` on a CPU (SciPy above; measured crossover on
#: one thread, SciPy in symmetric mode: block 1.17 vs SciPy 1.36 ms per imputation at 32 x 32,
#: 2.11 vs 1.74 at 40 x 40, 8.4 vs 4.3 at 64 x 64)
AUTO_BLOCK_WIDTH = 32
#: the removal fractions of ROAD (the paper's 10 %..90 %)
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: (row offset, column offset) -> weight of the 8 neighbours in the imputation
NEIGHBOUR_WEIGHTS = {(-1, -1): 1 / 12, (-1, 0): 1 / 6, (-1, 1): 1 / 12, (0, -1): 1 / 6,
                     (0, 1): 1 / 6, (1, -1): 1 / 12, (1, 0): 1 / 6, (1, 1): 1 / 12}


def noisy_linear_impute(x: torch.Tensor, removed: torch.Tensor, noise: float = 0.01, generator=None,
                        method: str = "auto") -> torch.Tensor:
    """Impute the removed pixels of a batch: (N, C, H, W) images, (N, H, W) bool -> (N, C, H, W).

    Kept pixels are returned unchanged; removed ones get the solution of the ROAD system (module
    docstring) plus ``noise * N(0, 1)`` (drawn from ``generator``, on the CPU, so a seed gives the same
    noise on every device). method: "block" (`block_solve`: exact block-tridiagonal elimination, all
    images at once), "cg" (`cg_solve`), "scipy" (`scipy_impute` per image, the images spread over
    `torch.get_num_threads()` threads: SuperLU lets go of the GIL) or "auto": "block" on a GPU, and
    on the CPU for inputs up to `AUTO_BLOCK_WIDTH` pixels wide, "scipy" above (on the CPU a sparse LU
    beats the dense blocks, whose cost grows as H * W^3: at 112 x 112, 23 ms against 43 ms of CPU
    time per imputation on one thread; `scripts/bench_road_imputer.py` measures it). The two solve
    the same system and differ by rounding (~1e-14).
    """
    if method == "auto":
        method = "block" if x.device.type != "cpu" or x.shape[-1] <= AUTO_BLOCK_WIDTH else "scipy"
    removed = removed.to(torch.bool)
    if method == "block":
        u = block_solve(x, removed)
    elif method == "cg":
        u = cg_solve(x, removed)
    elif method == "scipy":
        xs, ms = x.detach().cpu().double().numpy(), removed.cpu().numpy()
        workers = min(torch.get_num_threads(), len(xs))
        if workers > 1:  # each image is solved alone, so the threads change no number
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as pool:
                solved = list(pool.map(scipy_impute, xs, ms))
        else:
            solved = [scipy_impute(a, b) for a, b in zip(xs, ms)]
        u = torch.from_numpy(np.stack(solved)).to(x)
    else:
        raise ValueError(f"unknown imputation method {method!r}: use auto, block, cg or scipy")
    if noise:
        eps = draw_noise(u.shape, generator).to(u)
        u = u + noise * eps * removed.unsqueeze(1).to(u)
    return torch.where(removed.unsqueeze(1), u, x)


def _neighbour_sums(h: int, w: int, dtype, device) -> torch.Tensor:
    """(H, W): d_i, the sum of the weights of pixel i's neighbours inside the image."""
    pad = torch.nn.functional.pad(torch.ones(h, w, dtype=dtype, device=device), (1, 1, 1, 1))
    return sum(wt * pad[1 + dr:1 + dr + h, 1 + dc:1 + dc + w] for (dr, dc), wt in NEIGHBOUR_WEIGHTS.items())


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
    regions, so `block_solve` is the default. A region with no kept pixel stays 0.
    """
    n, c, h, w = x.shape
    dtype, device = x.dtype, x.device
    m = removed.to(dtype).unsqueeze(1)                     # (N, 1, H, W), 1 where unknown
    shifts = [(dr, dc, wt) for (dr, dc), wt in NEIGHBOUR_WEIGHTS.items()]

    def conv(t):  # sum_j w_ij t_j over the in-image neighbours j of every pixel i (zero outside)
        padded = torch.nn.functional.pad(t, (1, 1, 1, 1))
        out = torch.zeros_like(t)
        for dr, dc, wt in shifts:
            out = out + wt * padded[..., 1 + dr:1 + dr + h, 1 + dc:1 + dc + w]
        return out
    diag = conv(torch.ones(1, 1, h, w, dtype=dtype, device=device))          # in-image neighbour weight sum
    inv_diag = torch.where(m > 0, 1.0 / diag, torch.zeros_like(m))
    b = conv(x * (1 - m)) * m                               # (N, C, H, W)

    def matvec(u):
        return (diag * u - conv(u)) * m

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


#: the 3 x 3 stencil in row-major order (flat index increasing): each matrix row's columns come out sorted
_STENCIL = sorted([*NEIGHBOUR_WEIGHTS, (0, 0)])
#: SuperLU's panel size (columns factored together); the default (10) is tuned for wider supernodes than
#: this 2-D 9-point system has: 2 is 1.2-1.3x faster at 224 x 224 (measured in two runs: 80-83 vs
#: 104-106 ms per imputation with the matrix assembly below, one thread)
SUPERLU_PANEL_SIZE = 2


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
    var = np.full(h * w, -1, dtype=np.int64)  # pixel -> unknown number (increasing with the pixel)
    var[idx] = np.arange(n)
    rows, cols = np.divmod(idx, w)
    # row i of the matrix, one stencil entry per column of these (n, 9) arrays; the matrix is
    # symmetric, so its rows assembled as CSR are its CSC columns
    values = np.zeros((n, 9))
    columns = np.zeros((n, 9), dtype=np.int64)
    present = np.zeros((n, 9), dtype=bool)
    diag = np.zeros(n)
    rhs = np.zeros((n, c))
    for k, (dr, dc) in enumerate(_STENCIL):
        if (dr, dc) == (0, 0):
            centre = k
            continue
        wt = NEIGHBOUR_WEIGHTS[(dr, dc)]
        rr, cc = rows + dr, cols + dc
        inside = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
        nb = np.where(inside, rr * w + cc, 0)
        diag += wt * inside
        unknown = inside & gone[nb]
        present[:, k], columns[:, k], values[:, k] = unknown, var[nb], -wt
        rhs += (wt * (inside & ~unknown))[:, None] * flat[:, nb].T  # kept neighbours: known values
    present[:, centre], columns[:, centre], values[:, centre] = True, np.arange(n), diag
    indptr = np.concatenate([[0], np.cumsum(present.sum(1))])
    a = csc_matrix((values[present], columns[present], indptr), shape=(n, n))
    # the matrix is symmetric positive definite (see the module's docstring): SuperLU in its symmetric
    # mode (minimum-degree ordering of A + Aᵀ, diagonal pivots) factors it without pivoting, 1.5x
    # faster than `spsolve`'s default column ordering at 112 x 112 (13.8 vs 20.8 ms, same values to 7e-15)
    lu = splu(a, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, panel_size=SUPERLU_PANEL_SIZE,
              options={"SymmetricMode": True})
    flat[:, idx] = lu.solve(rhs).T
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
