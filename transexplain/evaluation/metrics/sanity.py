"""The model-randomisation sanity check (Adebayo, Gilmer, Muelly, Goodfellow, Hardt and Kim,
NeurIPS 2018, "Sanity checks for saliency maps", Sec. 3.1, cascading randomisation).

Protocol: the model's weights are re-initialised stage by stage from the top (the classifier head,
then the last Transformer block, then the one below, ... down to the patch embedding), each stage
keeping the stages above it random (cascading); after each stage the method explains the same
images again (the class explained stays the one the trained model predicted). The score of a stage
is the Spearman rank correlation between the trained model's map and the randomised model's map,
``ρ = Pearson(rank(Φ), rank(Φ_rand))`` over the pixels, with average ranks for ties (Adebayo et al.
report it for the absolute maps as well; ours are the maps the method returns, already >= 0 for
every built-in method). A method whose maps do not change as the model is destroyed fails the
check; the per-image value is the mean ρ over the stages (lower is better), the per-stage values
are kept. NaN where either map is constant. Re-initialising the model belongs to the runner
(`transexplain.evaluation.suite.cascading_randomisation`); this module only compares maps.
"""
from __future__ import annotations

import numpy as np
import torch

from ._common import as_tensor, ordering_values


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """(N, n) -> (N, n) float64 ranks 1..n along the last axis, ties given their average rank
    (scipy.stats.rankdata's "average"), in torch on the values' device.

    After one stable sort, a run of equal values spans positions first..last; each of its members
    gets (first + last) / 2 + 1: `first` is a running maximum of the positions where a run starts,
    `last` a running minimum, from the right, of the positions where one ends.
    """
    n = values.shape[-1]
    ordered, order = values.sort(dim=-1, stable=True)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    ends = torch.ones_like(starts)
    ends[..., :-1] = starts[..., 1:]
    pos = torch.arange(n, device=values.device).expand_as(order)
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(-1).values
    last = torch.where(ends, pos, torch.full_like(pos, n)).flip(-1).cummin(-1).values.flip(-1)
    return torch.empty(order.shape, dtype=torch.float64, device=values.device).scatter_(
        -1, order, (first + last).to(torch.float64) / 2 + 1)


def _ranks(a: torch.Tensor) -> torch.Tensor:
    """Average ranks along the last axis, of the values every ranking uses (`_common.ordering_values`)."""
    flat = a.reshape(-1, a.shape[-1])
    return average_ranks(ordering_values(flat)).reshape(a.shape)


def spearman(maps, other) -> np.ndarray:
    """(B, H, W), (..., B, H, W) -> (..., B) Spearman ρ per image; NaN where either map is constant or holds NaN.

    Computed in torch on the maps' device (a GPU ranks the maps of a batch at once)."""
    a, o = (as_tensor(t).detach().to(torch.float64) for t in (maps, other))
    o = o.to(a.device)
    ra = _ranks(a.reshape(*a.shape[:-2], -1))
    ro = _ranks(o.reshape(*o.shape[:-2], -1))
    ra = ra - ra.mean(-1, keepdim=True)
    ro = ro - ro.mean(-1, keepdim=True)
    num = (ra * ro).sum(-1)
    den = torch.sqrt((ra * ra).sum(-1) * (ro * ro).sum(-1))
    # a map holding NaN has no ranking (SciPy's rankdata propagates it): its ρ is NaN too
    defined = (den > 0) & ~torch.isnan(a).flatten(-2).any(-1) & ~torch.isnan(o).flatten(-2).any(-1)
    rho = torch.where(defined, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(den, float("nan")))
    return rho.cpu().numpy()


def randomisation(maps, randomised_maps) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W) trained maps, (L, B, H, W) maps after each cascading stage ->
    ((B,) mean ρ over the stages, NaN if any stage is NaN; (B, L) ρ per stage)."""
    rho = spearman(maps, randomised_maps).T  # (B, L)
    return rho.mean(1), rho
