"""The precision an explanation (and a benchmark's forwards) is computed in.

`float64` (the default) makes every map independent of the CPU kernels PyTorch picks: the LRP
rules divide by sums that nearly cancel (a + b at a residual, a @ b in attention), and in float32
the rounding of those operands, which differs between AVX-512, AVX2 and portable kernels, decides
the quotient. In float64 the same rounding is 1e-16 relative and the maps agree to far below 1e-3
(docs/numerics.md has the measurements). `float32` is the fast mode for those who accept the drift.

A model is never modified: `at_precision` hands back a cached copy cast to the wanted dtype (the
model itself when it already has it), rebuilt when any parameter of the original changes.
"""
from __future__ import annotations

import copy
import weakref

import torch

from .errors import UserError

PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
DEFAULT_PRECISION = "float64"

_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def check_precision(precision: str | None) -> str:
    """The precision's name, checked ('float64' when None)."""
    precision = DEFAULT_PRECISION if precision is None else str(precision)
    if precision not in PRECISIONS:
        raise UserError(f"Unknown precision {precision!r}: use float64 (the same numbers on every machine) or float32 (faster).")
    return precision


def _state_key(model: torch.nn.Module) -> tuple:
    tensors = list(model.parameters()) + list(model.buffers())
    return tuple((id(t), t._version, t.data_ptr(), t.device) for t in tensors)


def at_precision(model: torch.nn.Module, precision: str | None) -> torch.nn.Module:
    """`model` computing in `precision`: the model itself if its parameters already have that dtype,
    else a copy cast to it (kept while the original's parameters are unchanged)."""
    dtype = PRECISIONS[check_precision(precision)]
    first = next(model.parameters(), None)
    if first is None or first.dtype == dtype:
        return model
    key = _state_key(model)
    per_model = _COPIES.setdefault(model, {})
    hit = per_model.get(dtype)
    if hit is not None and hit[0] == key:
        return hit[1]
    clone = copy.deepcopy(model).to(dtype).eval()
    per_model[dtype] = (key, clone)
    return clone


def adapter_at(model_or_adapter, precision: str | None):
    """An adapter whose model computes in `precision` (adapters are cached with their model copy)."""
    from .models import as_adapter
    from .models.base import EncoderAdapter

    model = model_or_adapter.model if isinstance(model_or_adapter, EncoderAdapter) else model_or_adapter
    cast = at_precision(model, precision)
    if cast is model and isinstance(model_or_adapter, EncoderAdapter):
        return model_or_adapter
    cached = getattr(cast, "_transexplain_adapter", None)
    if cached is None or cached.model is not cast:
        if isinstance(model_or_adapter, EncoderAdapter):
            cached = model_or_adapter.with_model(cast)  # keeps a text adapter's tokenizer and length
        else:
            cached = as_adapter(cast)
        object.__setattr__(cast, "_transexplain_adapter", cached)
    return cached
