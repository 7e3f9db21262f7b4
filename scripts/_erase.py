"""Training augmentation shared by the embedded models' training scripts: black out random regions.

The perturbation benchmark sets the pixels of an upsampled 14x14 (or 7x7) map's lowest or highest
scores to black. A model that has never seen black regions reads them as new shapes and collapses
after the first step whatever the map, so every method scores alike. Here, with probability `p`,
a random low-resolution map is upsampled bilinearly and its lowest fraction q ~ U(0, 0.9) of pixels
is set to black (no mask or label is used), as in Hooker et al.'s argument for making removed
pixels in-distribution.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def random_black_regions(x: torch.Tensor, g: torch.Generator, p: float = 0.5, black: float = -1.0) -> torch.Tensor:
    """x: (B, C, H, W) normalised images; `black` is black in that normalisation."""
    if p <= 0:
        return x
    b, _, h, w = x.shape
    hit = torch.rand(b, generator=g) < p
    if not hit.any():
        return x
    n = int(hit.sum())
    res = 7 if torch.rand(1, generator=g).item() < 0.5 else 14
    noise = torch.rand(n, 1, res, res, generator=g)
    maps = F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False).flatten(1)
    q = torch.rand(n, 1, generator=g) * 0.9
    cut = torch.quantile(maps, q.squeeze(1), dim=1).diagonal().unsqueeze(1)
    drop = (maps < cut).reshape(n, 1, h, w)
    out = x.clone()
    out[hit] = torch.where(drop, torch.full_like(out[hit], black), out[hit])
    return out
