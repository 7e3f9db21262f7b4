"""AttnLRP (Achtibat et al., ICML 2024) and CP-LRP (Ali et al., ICML 2022): relevance to the input.

Both run one recorded forward and one walk back over its tape (`lrp.propagate`) with their rule
sets from `lrp/attnlrp.py`, and hand back the input relevance: for images per pixel, summed over the
colour channels (`pixel_level`); for text per token, at the embedding output summed over the hidden
units (the text tape starts there, as for `full_lrp`). The relevance of the target class starts
as its logit (AttnLRP) or as the unit gradient of that logit (CP-LRP, Gradient × Input).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..lrp import propagate
from ..lrp.attnlrp import AttnLRPRules, DetachedGradientRules
from .base import Explainer, register, select_target


def _input_relevance(explainer, adapter, x, target, rules, seed_is_logit: bool):
    pixels = bool(getattr(adapter, "pixel_input", True))
    explainer.pixel_level = pixels  # set per call, before api.explain reads it (as full_lrp does)
    trace = adapter.run(x, record=True)
    logits = trace.logits.detach()
    target = select_target(logits, target)
    seed = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
    if seed_is_logit:
        seed = seed * logits
    result = propagate(trace.tape, trace.logits, seed, rules, input_tensor=trace.input)
    out = result.input_relevance
    if out is None:
        out = torch.zeros_like(trace.input)
    inp = trace.input.detach()
    rel = out if seed_is_logit else out * inp
    return (rel.sum(1) if pixels else rel.sum(-1)), logits, target


@register
class AttnLRP(Explainer):
    name = "attnlrp"
    needs = frozenset({"relevance"})
    description = ("AttnLRP (Achtibat et al. ICML 2024): ε-LRP with the softmax, uniform-product and identity rules, "
                   "to the pixels (text: embedding output, summed over hidden units).")
    class_specific = True
    pixel_level = True

    @classmethod
    def defaults(cls):
        return {"epsilon": 1e-6}

    def scores(self, adapter, x, target):
        eps = self.options["epsilon"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise UserError(f"AttnLRP's epsilon must be a finite number >= 0, got {eps!r}.")
        return _input_relevance(self, adapter, x, target, AttnLRPRules(eps), seed_is_logit=True)


@register
class CPLRP(Explainer):
    name = "cp_lrp"
    aliases = ("cplrp",)
    needs = frozenset({"relevance"})
    description = ("CP-LRP (Ali et al. ICML 2022): Gradient × Input with the attention probabilities and LayerNorm's "
                   "std held constant, to the pixels (text: embedding output, summed over hidden units).")
    class_specific = True
    pixel_level = True

    @classmethod
    def defaults(cls):
        return {"detach_mean": False}

    def scores(self, adapter, x, target):
        detach_mean = self.options["detach_mean"]
        if not isinstance(detach_mean, bool):
            raise UserError(f"CP-LRP's detach_mean must be true or false, got {detach_mean!r}.")
        return _input_relevance(self, adapter, x, target, DetachedGradientRules(detach_mean), seed_is_logit=False)
