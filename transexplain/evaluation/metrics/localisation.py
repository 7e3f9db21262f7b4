"""Localisation against a ground-truth mask: pointing game, relevance mass and rank accuracy.

Pure functions of (B, H, W) maps and (B, H, W) {0, 1} masks (1 = the object); no forward at all.
* **Pointing game** (Zhang et al., ECCV 2016; the localisation baseline of Arras, Osman and Samek,
  Information Fusion 2022, "CLEVR-XAI"): a hit when the map's maximum lies on the object, ``hit = 1
  if argmax_p R_p in GT``. Equal maxima (within 2**-32 of the map's range, `_common.ordering_values`): a hit when any of them is on the object (Quantus does the
  same). ``tolerance`` > 0 (pixels, Chebyshev distance) widens the object as Zhang et al.'s 15-pixel
  tolerance does; 0 by default.
* **Relevance mass accuracy** (Arras et al. 2022, Eq. 1): the share of positive relevance inside the
  mask, ``RMA = sum_{p in GT} R+_p / sum_p R+_p`` with ``R+ = max(R, 0)``.
* **Relevance rank accuracy** (Arras et al. 2022, Eq. 2): with K = |GT|, the share of the K most
  relevant pixels that lie inside the mask, ``RRA = |top_K(R) ∩ GT| / K`` (ties in the top K by
  increasing flat index, as everywhere in transexplain).
All higher-is-better, in [0, 1]. NaN where the mask is empty, where the map is constant, and (RMA)
where there is no positive relevance.
"""
from __future__ import annotations

import numpy as np
import torch

from ._common import degenerate, ordering_values, removal_rank


def _prepare(maps, masks):
    maps = np.asarray(maps.detach().cpu() if isinstance(maps, torch.Tensor) else maps, dtype=np.float64)
    masks = np.asarray(masks.detach().cpu() if isinstance(masks, torch.Tensor) else masks) != 0
    if maps.ndim == 2:
        maps, masks = maps[None], masks[None]
    if maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
    bad = degenerate(maps) | (masks.reshape(len(masks), -1).sum(1) == 0)
    return maps, masks, bad


def pointing_game(maps, masks, tolerance: int = 0) -> np.ndarray:
    """(B,) 1.0 for a hit, 0.0 for a miss, NaN for an empty mask or a constant map."""
    maps, masks, bad = _prepare(maps, masks)
    if tolerance > 0:
        t = torch.from_numpy(masks.astype(np.float64)).unsqueeze(1)
        masks = torch.nn.functional.max_pool2d(t, 2 * tolerance + 1, stride=1, padding=tolerance)[:, 0].numpy() > 0
    flat = ordering_values(torch.from_numpy(maps.reshape(len(maps), -1))).numpy()
    m = masks.reshape(len(masks), -1)
    top = flat == flat.max(1, keepdims=True)
    hit = (top & m).any(1).astype(np.float64)
    hit[bad] = np.nan
    return hit


def relevance_mass_accuracy(maps, masks) -> np.ndarray:
    """(B,) share of the positive relevance inside the mask."""
    maps, masks, bad = _prepare(maps, masks)
    pos = np.clip(maps, 0, None).reshape(len(maps), -1)
    inside = (pos * masks.reshape(len(masks), -1)).sum(1)
    total = pos.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = inside / total
    out[bad | (total == 0)] = np.nan
    return out


def relevance_rank_accuracy(maps, masks) -> np.ndarray:
    """(B,) share of the |GT| most relevant pixels inside the mask."""
    maps, masks, bad = _prepare(maps, masks)
    rank = removal_rank(torch.from_numpy(maps), most_first=True).numpy().reshape(len(maps), -1)
    m = masks.reshape(len(masks), -1)
    k = m.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = ((rank < k) & m).sum(1) / k[:, 0]
    out[bad] = np.nan
    return out
