"""Helpers every metric family shares: removal orders, step counts, degenerate maps."""
from __future__ import annotations

import numpy as np
import torch

from ... import rng
from ...parallel import thread_map


def as_tensor(a, dtype=torch.float64) -> torch.Tensor:
    """A tensor as it is; anything else as a `dtype` tensor (an array of negative strides copied first)."""
    if isinstance(a, torch.Tensor):
        return a
    arr = np.asarray(a)
    return torch.as_tensor(arr if arr.flags.c_contiguous else arr.copy(), dtype=dtype)


def step_counts(num_pixels: int, steps: int) -> list[int]:
    """Pixels changed at each of the ``steps + 1`` points of a curve: ``floor(num_pixels * k / steps)``,
    k = 0..steps, in integer arithmetic (so 0 first and every pixel last, with no rounding surprise)."""
    if steps < 1:
        raise ValueError(f"a curve needs at least one step, got {steps}")
    return [num_pixels * k // steps for k in range(steps + 1)]


def fraction_counts(num_pixels: int, fractions) -> list[int]:
    """Pixels changed at each fraction: ``int(num_pixels * f)`` (truncation, as the paper's protocol)."""
    return [int(num_pixels * float(f) + 1e-9) for f in fractions]


#: every ranking of a map (removal orders, top-K, the pointing game's maximum, Spearman's ranks) is
#: taken on the map's values rounded to 2**-ORDER_BITS of its range (max - min). Values equal in exact
#: arithmetic but apart in their last bits (e.g. a coarse grid spread by upsampling, which each CPU's
#: kernels round differently: measured 1.1e-15 apart between ATEN_CPU_CAPABILITY=default and avx512 on
#: the embedded Swin, reordering ~1,300 pixels per image) then become exact ties, broken by flat index
#: on every machine. 2**-32 ≈ 2.3e-10 of the range sits far above float64 rounding (≈1e-16) and far
#: below the float32 precision of the maps themselves (≈6e-8), so no genuine order changes.
ORDER_BITS = 32


def ordering_values(flat: torch.Tensor) -> torch.Tensor:
    """(B, N) map values -> (B, N) float64 integers in [0, 2**ORDER_BITS]: the values every ranking uses.

    Monotone (non-decreasing) in the value, so it only merges values closer than 2**-ORDER_BITS of the
    map's range into ties; a constant map gives all zeros.
    """
    flat = flat.to(torch.float64)
    lo = flat.amin(1, keepdim=True)
    hi = flat.amax(1, keepdim=True)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return torch.round((flat - lo) / span * float(2 ** ORDER_BITS))


def removal_rank(maps: torch.Tensor, most_first: bool = True) -> torch.Tensor:
    """(B, H, W) maps -> (B, H, W) int64: each pixel's position in the removal order.

    Most relevant first (``most_first``) or least relevant first; equal values go in increasing flat
    (row-major) index, in both orders (a stable sort), as the paper's perturbation test does. Values
    are compared through `ordering_values` (near-ties below 2**-32 of the range are ties).
    """
    b, h, w = maps.shape
    flat = ordering_values(maps.reshape(b, h * w))
    order = torch.argsort(flat, dim=1, descending=most_first, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=flat.device).expand(b, -1).contiguous())
    return rank.reshape(b, h, w)


def first_k_masks(maps: torch.Tensor, counts, most_first: bool = True) -> torch.Tensor:
    """(B, H, W) maps, S counts -> (B, S, H, W) bool: True on the first ``counts[s]`` pixels of the order."""
    rank = removal_rank(maps, most_first)
    counts = torch.as_tensor(list(counts), device=maps.device).view(1, -1, 1, 1)
    return rank.unsqueeze(1) < counts


def degenerate(maps) -> np.ndarray:
    """(B, ...) -> (B,) bool: the map is constant (max == min, or empty), so it ranks nothing.

    Every ranking or localisation metric records NaN for such a map; summaries count the NaNs
    (`nan_summary`) instead of averaging them away.
    """
    a = np.asarray(maps.detach().cpu() if isinstance(maps, torch.Tensor) else maps, dtype=np.float64)
    flat = a.reshape(len(a), -1)
    if flat.shape[1] == 0:
        return np.ones(len(a), dtype=bool)
    return flat.max(1) == flat.min(1)


def with_nan(values, bad) -> np.ndarray:
    """values as float64 with NaN where ``bad``."""
    values = np.array(values, dtype=np.float64, copy=True)
    values[np.asarray(bad, dtype=bool)] = np.nan
    return values


def nan_summary(values) -> dict:
    """Mean over the finite values, with how many were NaN: ``{"mean", "n", "nan"}`` (mean NaN when none)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = np.isfinite(v)
    return {"mean": float(v[finite].mean()) if finite.any() else float("nan"), "n": int(finite.sum()),
            "nan": int((~finite).sum())}


def with_fill(x: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images, (B, S, H, W) masks, fill broadcastable to (B, S, C, H, W) -> (B, S, C, H, W)
    copies with ``fill`` where the mask is True."""
    return torch.where(masks.unsqueeze(2), fill, x.unsqueeze(1))


def counter_based(generator) -> bool:
    """Whether `noise` draws from `generator` (one, or a list) on the target device (`rng.Stream`)."""
    first = generator[0] if isinstance(generator, (list, tuple)) and len(generator) else generator
    return isinstance(first, rng.Stream)


def noise(shape, generator=None, kind: str = "randn", device=None) -> torch.Tensor:
    """(B, ...) float64 noise, the same numbers on every machine, on `device`.

    `generator`: a `transexplain.rng.Stream` (or a list of one per sample): counter-based draws made
    on `device` itself (`rng.draw`; what the suite uses). Or a torch.Generator for the whole batch, or
    a list of one per sample, drawn on the CPU (torch's CPU and CUDA generators give different
    numbers) and, for a CUDA `device`, into pinned memory, copied without blocking. With a list each
    sample's slice comes from its own generator (then a sample's noise depends on that sample alone:
    the same whatever the batch it is in)."""
    if counter_based(generator):
        return rng.draw(generator, shape, kind, device)
    device = torch.device(device) if device is not None else torch.device("cpu")
    pin = device.type == "cuda"
    out = torch.empty(tuple(shape), dtype=torch.float64, pin_memory=pin)

    def fill(t: torch.Tensor, g) -> None:  # = torch.randn / torch.rand(t.shape, generator=g), in place
        t.normal_(0.0, 1.0, generator=g) if kind == "randn" else t.uniform_(0.0, 1.0, generator=g)

    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        # samples sharing a generator (ROAD's copies of one image) draw from it in turn; distinct
        # generators draw in parallel threads (on a GPU these float64 CPU draws cost more than the
        # model's forwards: 8 images x 9 ROAD copies at 3 x 224 x 224 are 10.8 M normals)
        groups: dict[int, tuple] = {}
        for i, g in enumerate(generator):
            groups.setdefault(id(g), (g, []))[1].append(i)
        thread_map(lambda group: [fill(out[i], group[0]) for i in group[1]], list(groups.values()))
    else:
        fill(out, generator)
    return out.to(device, non_blocking=pin)
