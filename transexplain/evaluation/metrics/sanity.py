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

from ._common import ordering_values


def _ranks(a: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis, of the values every ranking uses (`_common.ordering_values`)."""
    from scipy.stats import rankdata

    flat = a.reshape(-1, a.shape[-1])
    keyed = ordering_values(torch.from_numpy(np.ascontiguousarray(flat))).numpy().reshape(a.shape)
    return rankdata(keyed, axis=-1, method="average")


def spearman(maps, other) -> np.ndarray:
    """(B, H, W), (..., B, H, W) -> (..., B) Spearman ρ per image; NaN where either map is constant."""
    a = np.asarray(maps.detach().cpu() if isinstance(maps, torch.Tensor) else maps, dtype=np.float64)
    o = np.asarray(other.detach().cpu() if isinstance(other, torch.Tensor) else other, dtype=np.float64)
    ra = _ranks(a.reshape(*a.shape[:-2], -1))
    ro = _ranks(o.reshape(*o.shape[:-2], -1))
    ra = ra - ra.mean(-1, keepdims=True)
    ro = ro - ro.mean(-1, keepdims=True)
    num = (ra * ro).sum(-1)
    den = np.sqrt((ra * ra).sum(-1) * (ro * ro).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = num / den
    return np.where(den > 0, rho, np.nan)


def randomisation(maps, randomised_maps) -> tuple[np.ndarray, np.ndarray]:
    """(B, H, W) trained maps, (L, B, H, W) maps after each cascading stage ->
    ((B,) mean ρ over the stages, NaN if any stage is NaN; (B, L) ρ per stage)."""
    rho = spearman(maps, randomised_maps).T  # (B, L)
    return rho.mean(1), rho
