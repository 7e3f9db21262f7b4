"""The precision an explanation (and a benchmark's forwards) is computed in.

The LRP rules divide by sums that nearly cancel (a + b at a residual, a @ b in attention); in
float32 the rounding of those operands, which differs between AVX-512, AVX2 and portable kernels,
decides the quotient. docs/numerics.md has the measurements.

- `float64` (the default): everything in float64. The maps agree across kernels and batch sizes to
  1e-9 or better; Transformer Attribution costs 2.3x its float32 mode.
- `mixed`: the model's forward, the gradients and every relevance rule in float64, except the
  products of the α=1, β=0 rule of the linear layers, whose denominators are sums of same-signed
  terms (well conditioned): those run in float32. The maps agree across kernels to 1.3e-7 at
  1.8x the float32 cost, but they move by ~1e-7 with the batch size and the kernels, which can
  reorder two nearly equal pixels in a benchmark's removal order.
- `float32`: the fast mode, for those who accept the drift.

A model is never modified: `at_precision` hands back a cached copy cast to the wanted dtype (the
model itself when it already has it), rebuilt when any parameter of the original changes.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import weakref

import torch

from .errors import UserError

#: precision name -> the dtype the model computes in
PRECISIONS = {"mixed": torch.float64, "float64": torch.float64, "float32": torch.float32}
DEFAULT_PRECISION = "float64"
#: what `--precision` says in every command's help
HELP = ("float64 (default: the same numbers on every machine and batch size), mixed (float64 but for the "
        "well-conditioned linear-rule products: 1.8x float32's cost, maps move by ~1e-7), or float32 (fastest; "
        "LRP maps move with the CPU's kernels).")

_LINEAR_RULE_DTYPE: contextvars.ContextVar = contextvars.ContextVar("linear_rule_dtype", default=None)


@contextlib.contextmanager
def computing(precision: str):
    """Within this block the LRP linear rules use the precision's product dtype."""
    token = _LINEAR_RULE_DTYPE.set(torch.float32 if check_precision(precision) == "mixed" else None)
    try:
        yield
    finally:
        _LINEAR_RULE_DTYPE.reset(token)


def linear_rule_dtype():
    """The dtype of the α=1, β=0 rule's products on float64 inputs (None: float64 itself)."""
    return _LINEAR_RULE_DTYPE.get()

_COPIES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def check_precision(precision: str | None) -> str:
    """The precision's name, checked (the default when None)."""
    precision = DEFAULT_PRECISION if precision is None else str(precision)
    if precision not in PRECISIONS:
        raise UserError(f"Unknown precision {precision!r}: use float64 (the default: the same numbers on every "
                        "machine), mixed or float32 (faster).")
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


#: the benchmarks' low precisions: the model in float32 with its forwards under `torch.autocast` in
#: this dtype (the perturbation test's forwards and the gradient methods; see docs/numerics.md)
AUTOCAST = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: what a benchmark's `--precision` says in its help
BENCHMARK_HELP = HELP[:-1] + (", or bfloat16 / float16 (the forwards and the gradient methods under autocast, "
                              "relevance methods in float32; see docs/numerics.md).")


def check_benchmark_precision(precision: str | None) -> str:
    """A benchmark's precision: one of PRECISIONS or of AUTOCAST."""
    if precision in AUTOCAST:
        return precision
    try:
        return check_precision(precision)
    except UserError:
        raise UserError(f"Unknown precision {precision!r}: use float64 (the default: the same numbers on every "
                        "machine), mixed, float32, or bfloat16 / float16 (fastest on a GPU).") from None


def model_precision(precision: str) -> str:
    """The precision the model's weights are kept in: float32 for an autocast precision."""
    return "float32" if precision in AUTOCAST else precision


def autocast(precision: str, device) -> contextlib.AbstractContextManager:
    """torch.autocast in the precision's dtype on `device` for an AUTOCAST precision, else nothing."""
    if precision not in AUTOCAST:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST[precision])
