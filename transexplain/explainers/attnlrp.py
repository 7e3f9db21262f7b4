"""AttnLRP (Achtibat et al., ICML 2024) and CP-LRP (Ali et al., ICML 2022): relevance to the input.

Both run one forward of the adapter under `lrp.core.gradient_rules` with their rules from
`lrp/attnlrp.py` (each op's output gets its modified local gradient), then one autograd backward of
the target logit, and hand back input ⊙ gradient: for images per pixel, summed over the colour
channels (`pixel_level`); for text per token, at the embedding output summed over the hidden units
(the text tape starts there, as for `full_lrp`). For AttnLRP that product is the relevance of its
rules (the relevance of the target class starting as its logit); for CP-LRP it is Gradient × Input
of the detached forward. `walk_relevance` computes the same by walking the recorded tape with the
rules node by node (`lrp.propagate`): the reference the tests compare with.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..lrp import propagate
from ..lrp.attnlrp import AttnLRPGradient, DetachedGradient
from ..lrp.core import gradient_rules
from .base import Explainer, register, select_target


def gradient_relevance(adapter, x, target, rules):
    """(input ⊙ modified gradient of the target logit, logits, target) for a gradient-rule set
    (`AttnLRPGradient`, `DetachedGradient`, `LibraGrad`), unreduced: (B, C, H, W) or (B, N, D)."""
    pixels = bool(getattr(adapter, "pixel_input", True))
    with torch.enable_grad(), gradient_rules(rules):
        if pixels:
            x = x.detach().requires_grad_(True)
        trace = adapter.run(x)
    logits = trace.logits
    target = select_target(logits.detach(), target)
    seed = F.one_hot(target, logits.shape[-1]).to(logits.dtype)
    (grad,) = torch.autograd.grad(logits, trace.input, seed, allow_unused=True)
    inp = trace.input.detach()
    rel = torch.zeros_like(inp) if grad is None else grad.mul_(inp)
    return rel, logits.detach(), target


def _input_relevance(explainer, adapter, x, target, rules):
    pixels = bool(getattr(adapter, "pixel_input", True))
    explainer.pixel_level = pixels  # set per call, before api.explain reads it (as full_lrp does)
    rel, logits, target = gradient_relevance(adapter, x, target, rules)
    return (rel.sum(1) if pixels else rel.sum(-1)), logits, target


def walk_relevance(adapter, x, target, rules, seed_is_logit: bool):
    """The same maps (reduced) by the walk over the recorded tape (`AttnLRPRules` with
    seed_is_logit=True, `DetachedGradientRules` with False): the reference for `gradient_relevance`."""
    pixels = bool(getattr(adapter, "pixel_input", True))
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
        return _input_relevance(self, adapter, x, target, AttnLRPGradient(eps))


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
        return _input_relevance(self, adapter, x, target, DetachedGradient(detach_mean))
