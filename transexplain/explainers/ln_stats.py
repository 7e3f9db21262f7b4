"""Transformer Attribution weighted by LayerNorm token statistics (our take on arXiv 2311.11378).

Every block's norm1 computes, per token t, μ_t = mean_c x_tc and σ_t = std_c x_tc of the block
input (σ as LayerNorm uses it: sqrt(biased variance + eps)). The adapters record them in
`Trace.extras["ln_stats"]` as one (μ, σ) pair of (B, N_b) rows per block, on block b's token grid.

The per-block matrix of Transformer Attribution, Ā^(b) = E_h[(∇A^(b) ⊙ R^(b))^+], is reweighted by
a per-token factor w^(b)_t (normalised to mean 1 over the sample's tokens, so the balance with
the identity term is kept) before the rollout v ← v (Ā + I). The candidates (`variant=`):

- `key_sigma`:     Ā · diag(w), w ∝ σ_t         (a key token with a large norm-scale counts more)
- `key_inv_sigma`: Ā · diag(w), w ∝ 1/σ_t       (tokens the LayerNorm amplifies count more)
- `query_sigma`:   diag(w) · Ā, w ∝ σ_t         (relevance leaving a query is weighted)
- `key_snr`:       Ā · diag(w), w ∝ |μ_t|/σ_t   (gate by the token's mean-to-spread ratio)
- `map_sigma`:     plain Transformer Attribution, final map ⊙ σ of the block it ends on
- `map_inv_sigma`: same with 1/σ

See docs/ln_stats.md for the measurements behind the default.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .attention import _check_start
from .base import Explainer, register, select_target, target_gradients
from .relevance import _rule_set, relevance_pass

VARIANTS = ("key_sigma", "key_inv_sigma", "query_sigma", "key_snr", "map_sigma", "map_inv_sigma")


def _normalised(w: torch.Tensor) -> torch.Tensor:
    """Per-sample rescale to mean 1 (a row of zeros stays zeros)."""
    mean = w.mean(-1, keepdim=True)
    return torch.where(mean > 0, w / torch.where(mean > 0, mean, torch.ones_like(mean)), torch.zeros_like(w))


def token_factor(mu: torch.Tensor, sigma: torch.Tensor, variant: str) -> torch.Tensor:
    if variant in ("key_sigma", "query_sigma", "map_sigma"):
        w = sigma
    elif variant in ("key_inv_sigma", "map_inv_sigma"):
        w = 1.0 / sigma
    elif variant == "key_snr":
        w = mu.abs() / sigma
    else:
        raise UserError(f"Unknown ln_stats variant {variant!r}: choose one of {', '.join(VARIANTS)}.")
    return _normalised(torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0))


def _layout(adapter, w: torch.Tensor, block: int) -> torch.Tensor:
    """Per-token row (B, N_b) in the layout of block `block`'s matrices, one row per matrix."""
    if hasattr(adapter, "layout_tokens"):
        return adapter.layout_tokens(w, block)
    return w


@register
class LNStats(Explainer):
    name = "ln_stats"
    needs = frozenset({"attention", "relevance", "ln_stats"})
    description = "Transformer Attribution with each block's matrix weighted by LayerNorm token statistics (μ, σ)."
    class_specific = True

    @classmethod
    def defaults(cls):
        return {"variant": "key_inv_sigma", "start_layer": None, "rule_set": "ours", "epsilon": "absolute"}

    def scores(self, adapter, x, target):
        variant = self.options["variant"]
        if variant not in VARIANTS:
            raise UserError(f"Unknown ln_stats variant {variant!r}: choose one of {', '.join(VARIANTS)}.")
        n_blocks = adapter.num_blocks
        start = self.options["start_layer"]
        if start is None:
            start = min(adapter.default_start_layer, n_blocks - 1)  # a one-block model: its only block
        _check_start(start, n_blocks)
        trace, target, result = relevance_pass(adapter, x, target, _rule_set(self.options["rule_set"], self.options["epsilon"]), start)
        stats = trace.extras.get("ln_stats")
        if stats is None:
            raise UserError(f"The {adapter.family} adapter does not record LayerNorm statistics: ln_stats needs them.")
        grads = target_gradients(trace.logits, target, trace.attentions[start:])
        v = adapter.readout(trace)
        for b in range(n_blocks - 1, start - 1, -1):
            rel = result.captured[("attn_value", b)]
            m = (grads[b - start] * rel).clamp(min=0).mean(1)
            if variant.startswith("key_"):
                w = _layout(adapter, token_factor(*stats[b], variant), b)
                m = m * w.unsqueeze(-2)
            elif variant.startswith("query_"):
                w = _layout(adapter, token_factor(*stats[b], variant), b)
                m = m * w.unsqueeze(-1)
            v = adapter.mix(v, b, m + adapter.identity_like(m))
        if variant.startswith("map_"):
            v = v * token_factor(*stats[start], variant)
        return v, trace.logits.detach(), target
