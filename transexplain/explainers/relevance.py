"""Methods that run a relevance pass: partial LRP, full LRP, Transformer Attribution."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..lrp import RULE_SETS, propagate
from ..lrp.rules import EPSILONS, RULE_SET_VARIANTS
from .attention import _check_start
from .base import Explainer, register, select_target, target_gradients


def _rule_set(name: str, epsilon: str = "absolute"):
    """The rule set `name` with the stabiliser `epsilon` ("absolute": the reference's 1e-9;
    "relative": ε·(|a|+|b|) at additions and bilinear products, see docs/numerics.md)."""
    if name not in RULE_SETS:
        raise UserError(f"Unknown rule set {name!r}: choose one of {', '.join(RULE_SETS)}.")
    if epsilon not in EPSILONS:
        raise UserError(f"Unknown epsilon {epsilon!r}: choose one of {', '.join(EPSILONS)}.")
    return RULE_SET_VARIANTS[(name, epsilon)]


def relevance_pass(adapter, x, target, rules, first_block: int | None, to_input: bool = False):
    """Forward with a tape, then LRP from the one-hot seed; R^(b) kept for blocks >= first_block."""
    trace = adapter.run(x, record=True)
    target = select_target(trace.logits, target)
    seed = F.one_hot(target, trace.logits.shape[-1]).to(trace.logits.dtype)
    keep = (lambda tag: tag[0] == "attn_value" and tag[1] >= first_block) if first_block is not None else (lambda tag: False)
    done = (lambda cap: ("attn_value", first_block) in cap) if (first_block is not None and not to_input) else (lambda cap: False)
    result = propagate(
        trace.tape, trace.logits, seed, rules, capture=keep, stop=done,
        input_tensor=trace.input if to_input else None,
    )
    return trace, target, result


@register
class TransformerAttribution(Explainer):
    name = "transformer_attribution"
    needs = frozenset({"attention", "relevance"})
    aliases = ("ours",)
    description = "Transformer Attribution (Chefer et al. CVPR 2021): rollout of mean-head (∇A ⊙ R)⁺ + I."
    class_specific = True

    @classmethod
    def defaults(cls):
        # row_normalize=False and start_layer=1 are the paper's ViT protocol; the BERT adapter
        # overrides them with the paper's text protocol (last layer only, row-normalised).
        return {"start_layer": None, "rule_set": "ours", "row_normalize": None, "epsilon": "absolute"}

    def scores(self, adapter, x, target):
        n_blocks = adapter.num_blocks
        start = self.options["start_layer"]
        if start is None:
            start = min(adapter.default_start_layer, n_blocks - 1)  # a one-block model: its only block
        _check_start(start, n_blocks)
        row_norm = self.options["row_normalize"]
        if row_norm is None:
            row_norm = adapter.default_row_normalize
        trace, target, result = relevance_pass(adapter, x, target, _rule_set(self.options["rule_set"], self.options["epsilon"]), start)
        grads = target_gradients(trace.logits, target, trace.attentions[start:])
        v = adapter.readout(trace)
        for b in range(n_blocks - 1, start - 1, -1):
            rel = result.captured[("attn_value", b)]
            m = (grads[b - start] * rel).clamp(min=0).mean(1)
            m = m + adapter.identity_like(m)
            if row_norm:
                m = m / m.sum(-1, keepdim=True)
            v = adapter.mix(v, b, m)
        return v, trace.logits.detach(), target


@register
class PartialLRP(Explainer):
    name = "partial_lrp"
    needs = frozenset({"attention", "relevance"})
    description = "Partial LRP (Voita et al. 2019): mean-head positive relevance of the last attention map."
    class_specific = True

    @classmethod
    def defaults(cls):
        return {"rule_set": "classic", "epsilon": "absolute"}

    def scores(self, adapter, x, target):
        last = adapter.num_blocks - 1
        trace, target, result = relevance_pass(adapter, x, target, _rule_set(self.options["rule_set"], self.options["epsilon"]), last)
        rel = result.captured[("attn_value", last)].clamp(min=0).mean(1)
        v = adapter.mix(adapter.readout(trace), last, rel)
        return v, trace.logits.detach(), target


@register
class FullLRP(Explainer):
    name = "full_lrp"
    needs = frozenset({"relevance"})
    description = ("LRP (Binder et al. 2016) with the classic rules: to the pixels (z^B at the patch embedding), "
                   "or for text to the embedding output, summed over hidden units.")
    class_specific = True
    #: images: a (B, H, W) pixel map; text: one score per token, so it takes the token-map path
    #: (`scores` sets it per call from the adapter, before api.explain reads it)
    pixel_level = True

    @classmethod
    def defaults(cls):
        return {"rule_set": "classic", "epsilon": "absolute"}

    def scores(self, adapter, x, target):
        pixels = bool(getattr(adapter, "pixel_input", True))
        self.pixel_level = pixels
        trace, target, result = relevance_pass(adapter, x, target, _rule_set(self.options["rule_set"], self.options["epsilon"]), None, to_input=True)
        rel = result.input_relevance
        if rel is None:
            rel = torch.zeros_like(trace.input)
        if not pixels:
            # the reference's text LRP stops at the embedding output (B, N, D): sum over the hidden units
            return rel.sum(-1), trace.logits.detach(), target
        return rel.sum(1), trace.logits.detach(), target
