"""The one-call Python API: `explain(model, images, method=..., target=...)`."""
from __future__ import annotations

import torch

from .errors import UserError
from .explainers import Explanation, get_method, normalise_per_sample, upsample
from .explainers.base import refusal, select_target
from .precision import DEFAULT_PRECISION, adapter_at, computing


def check_images(adapter, images) -> torch.Tensor:
    """Validate a (B, C, H, W) batch against the model's input and cast it to the model's dtype."""
    if not torch.is_tensor(images):
        raise UserError(f"Images must be a torch tensor of shape (B, C, H, W), got {type(images).__name__}.")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    c, h, w = adapter.input_size
    if images.dim() != 4:
        raise UserError(f"Images must have shape (B, {c}, {h}, {w}), got {tuple(images.shape)}.")
    if images.shape[1] != c:
        raise UserError(
            f"The model expects {c}-channel images but got {images.shape[1]} channels: convert grey-scale or RGBA images to RGB first."
        )
    if tuple(images.shape[2:]) != (h, w):
        raise UserError(
            f"The model expects {h}x{w} images but got {images.shape[2]}x{images.shape[3]}: resize them to {h}x{w} first."
        )
    if not images.is_floating_point():
        raise UserError("Images must be a floating-point tensor, normalised with the model's mean and std.")
    return images.to(device=adapter.device, dtype=adapter.dtype)


def explain(model, images, method: str = "transformer_attribution", target=None, precision: str = DEFAULT_PRECISION,
            **options) -> Explanation:
    """Explain `model`'s decision on a batch of images (or a text batch, for text adapters).

    target: None explains the predicted class; an int or one int per sample explains that class.
    precision: "float64" (default: the same map on every machine and batch size), "mixed" (float64
    but for the well-conditioned linear-rule products: faster, maps move by ~1e-7) or "float32"
    (fastest; the LRP-based maps then move with the CPU's kernels). See docs/numerics.md. The model
    is not modified: a cast copy is used (and cached) when its dtype differs; the maps come out in
    this precision.
    options: the method's keyword options (e.g. start_layer, rule_set); see `list_methods()`.
    """
    if torch.is_tensor(target) and target.is_inference():
        target = target.clone()  # a target predicted under torch.inference_mode cannot enter autograd
    adapter = adapter_at(model, precision)
    explainer = get_method(method)(**options)
    reason = refusal(explainer.name, adapter)
    if reason:
        raise UserError(reason)
    x = adapter.prepare(images) if hasattr(adapter, "prepare") else check_images(adapter, images)
    if torch.is_tensor(x) and x.is_floating_point() and not x.requires_grad:
        # a frozen model (no parameter requires grad) must still give the gradient methods a graph
        x = x.detach().requires_grad_(True)
    with computing(precision):
        scores, logits, chosen = _scores_in_calls(explainer, adapter, x, target)
    # attention-only methods hand back the target as given (None, an int, a list): settle it here
    chosen = select_target(logits, chosen if torch.is_tensor(chosen) else target)
    scores = torch.nan_to_num(scores.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    if explainer.pixel_level:
        token_map = scores
    else:
        token_map = adapter.to_token_map(scores, batch=x)  # padding from x, not from the adapter's last run
    if hasattr(adapter, "heatmap_from_tokens"):
        heatmap = adapter.heatmap_from_tokens(token_map, batch=x)
    else:
        heatmap = normalise_per_sample(upsample(token_map, tuple(x.shape[-2:])))
    return Explanation(
        token_map=token_map, heatmap=heatmap, target=chosen.detach(), logits=logits.detach(),
        method=explainer.name, extras={"scores": scores},
    )


def rows_per_call(adapter, x) -> int:
    """How many rows of `x` one explainer call takes: as many as keep the forward's saved tensors
    under the device's graph budget (`explainers.memory`: 1 GiB on a CPU, a quarter of a GPU),
    measured per row once per model and input shape. A method's graph is a small multiple of its
    forward's (docs/methods.md), so its memory no longer grows with the batch beyond that."""
    from .explainers import memory

    n = len(x)
    if n <= 1:
        return n
    model = getattr(adapter, "model", adapter)

    key = ("explain", id(model), tuple(x.shape[1:]), str(getattr(adapter, "dtype", None)), str(adapter.device))
    per_row = memory.graph_bytes_per_row(key, lambda inp: adapter.run(inp).logits,
                                         lambda rows: memory.repeat_first_row(x, rows))
    return memory.rows_within_budget(per_row, adapter.device)


def _scores_in_calls(explainer, adapter, x, target):
    """`explainer.scores` on the batch in calls of `rows_per_call` rows, put back together. Every
    method is batch-invariant (tests/test_properties.py), so the maps are those of one call."""
    n = len(x) if torch.is_tensor(x) or hasattr(x, "repeat") else 0
    rows = rows_per_call(adapter, x) if n > 1 else n
    if rows >= n:
        return explainer.scores(adapter, x, target)
    per_row_target = None
    if target is not None:
        t = torch.as_tensor(target).long().reshape(-1)
        if t.numel() not in (1, n):
            raise UserError(f"Got {t.numel()} targets for {n} images: give one target, or one per image.")
        per_row_target = t if t.numel() == n else None
    parts = []
    for start in range(0, n, rows):
        part = slice(start, start + rows)
        t = target if target is None or per_row_target is None else per_row_target[part]
        scores, logits, chosen = explainer.scores(adapter, x[part], t)
        # detached at once: a call's logits (or scores) can hold its whole autograd graph
        parts.append((scores.detach(), logits.detach(), chosen.detach() if torch.is_tensor(chosen) else chosen))
    scores = torch.cat([p[0] for p in parts])
    logits = torch.cat([p[1] for p in parts])
    chosen = [p[2] for p in parts]
    chosen = torch.cat([c.reshape(-1) for c in chosen]) if all(torch.is_tensor(c) for c in chosen) else target
    return scores, logits, chosen
