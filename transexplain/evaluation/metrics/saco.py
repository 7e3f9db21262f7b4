"""SaCo, the salience-guided faithfulness coefficient (Wu, Kang, Sun, Wan and Qu, CVPR 2024,
"On the Faithfulness of Vision Transformer Explanations", Sec. 3 and Algorithm 1).

Protocol: the pixels, ranked by decreasing salience (ties by increasing flat index), are split into
K groups of equal size (``G_1`` the most salient; group i holds ranks ``floor(N(i-1)/K)`` to
``floor(Ni/K) - 1``, N = H*W). Each group is perturbed on its own, not cumulatively (its pixels
replaced by the image's per-channel mean, the paper's "per-sample mean"), giving
``Δ_i = p(ŷ | x) - p(ŷ | x with G_i perturbed)`` for the explained class ŷ, and ``s_i = sum_{p in G_i}
M_p`` is the group's salience. For every pair i < j (so s_i >= s_j by construction), with
``w_ij = s_i - s_j``:

    F = sum_{i<j} sign_ij * w_ij / sum_{i<j} w_ij,   sign_ij = +1 if Δ_i >= Δ_j else -1.

F lies in [-1, 1]: 1 when the prediction drops at least as much for every more salient group.
K = 10 (the paper). A constant map (every w_ij = 0; also any map whose group sums are all equal) has
F = 0/0: NaN. The paper evaluates patch-level maps; ours are the pixel maps every method returns.
"""
from __future__ import annotations

import numpy as np
import torch

from ._common import degenerate, removal_rank, with_fill

#: number of groups (the paper's K)
GROUPS = 10


def saco_groups(maps: torch.Tensor, groups: int = GROUPS) -> torch.Tensor:
    """(B, H, W) -> (B, K, H, W) bool: the K disjoint groups, most salient first."""
    h, w = maps.shape[-2:]
    n = h * w
    rank = removal_rank(maps, most_first=True).unsqueeze(1)
    k = torch.arange(groups, device=maps.device).view(1, -1, 1, 1)
    lo, hi = (n * k) // groups, (n * (k + 1)) // groups
    return (rank >= lo) & (rank < hi)


def group_salience(maps, groups: torch.Tensor) -> np.ndarray:
    """(B, H, W) maps, (B, K, H, W) groups -> (B, K) ``s_i = sum of the map over group i``."""
    maps = torch.as_tensor(maps).to(torch.float64)
    return (maps.unsqueeze(1) * groups.to(torch.float64)).flatten(2).sum(-1).cpu().numpy()


def saco_inputs(x: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W), (B, K, H, W) -> (B, K, C, H, W): copy i has group i set to the per-channel mean."""
    return with_fill(x, groups, x.mean(dim=(2, 3), keepdim=True).unsqueeze(1))


def saco(salience, p_clean, p_perturbed, maps=None) -> np.ndarray:
    """(B, K) group saliences, (B,) clean probabilities, (B, K) perturbed ones -> (B,) F (NaN: degenerate)."""
    s = np.asarray(salience, dtype=np.float64)
    delta = np.asarray(p_clean, dtype=np.float64)[:, None] - np.asarray(p_perturbed, dtype=np.float64)
    i, j = np.triu_indices(s.shape[1], k=1)
    weight = s[:, i] - s[:, j]
    sign = np.where(delta[:, i] >= delta[:, j], 1.0, -1.0)
    total = np.abs(weight).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = (sign * weight).sum(1) / total
    f[total == 0] = np.nan
    if maps is not None:
        f[degenerate(maps)] = np.nan
    return f


def saco_loop(salience, p_clean, p_perturbed) -> float:
    """One image's F by the paper's loop over pairs (Algorithm 1), for the tests."""
    f = total = 0.0
    k = len(salience)
    for i in range(k - 1):
        for j in range(i + 1, k):
            delta_i, delta_j = p_clean - p_perturbed[i], p_clean - p_perturbed[j]
            weight = salience[i] - salience[j]
            f += weight if delta_i >= delta_j else -weight
            total += abs(weight)
    return f / total if total else float("nan")
