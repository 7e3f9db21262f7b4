"""Methods that weigh attention by the gradient of the target logit: GradCAM, generic attention.

Option `libragrad` (both; default false): the gradients are LibraGrad's (`captum_methods.libragrad_context`:
attention probabilities, LayerNorm's σ and GELU's gate held constant in the backward)."""
from __future__ import annotations

import torch

from .base import Explainer, register, select_target, target_gradients
from .captum_methods import libragrad_context


@register
class GradCAM(Explainer):
    name = "gradcam"
    needs = frozenset({"attention"})
    description = ("GradCAM on the last attention layer: heads weighted by their mean gradient, then ReLU; "
                   "option libragrad=true: LibraGrad's backward.")
    class_specific = True

    @classmethod
    def defaults(cls):
        return {"libragrad": False}

    def scores(self, adapter, x, target):
        with libragrad_context(self.options):
            trace = adapter.run(x)
        target = select_target(trace.logits, target)
        last = len(trace.attentions) - 1
        att = trace.attentions[last]
        (grad,) = target_gradients(trace.logits, target, [att])
        att, grad = att.detach(), grad.detach()
        readout = adapter.readout(trace)
        heads = att.shape[1]
        weighted = None
        for h in range(heads):
            if adapter.gradcam_full_matrix:
                alpha = adapter.masked_matrix_mean(grad[:, h], trace)
            else:
                alpha = adapter.content_mean(adapter.mix(readout, last, grad[:, h]))
            row = adapter.mix(readout, last, att[:, h]) * alpha.unsqueeze(-1)
            weighted = row if weighted is None else weighted + row
        return (weighted / heads).clamp(min=0), trace.logits.detach(), target


@register
class GenericAttention(Explainer):
    name = "generic_attention"
    needs = frozenset({"attention"})
    description = ("Generic attention explainability (Chefer et al. ICCV 2021): R += mean-head (∇A⊙A)⁺ R; "
                   "option libragrad=true: LibraGrad's backward.")
    class_specific = True

    @classmethod
    def defaults(cls):
        return {"libragrad": False}

    def scores(self, adapter, x, target):
        with libragrad_context(self.options):
            trace = adapter.run(x)
        target = select_target(trace.logits, target)
        grads = target_gradients(trace.logits, target, trace.attentions)
        v = adapter.readout(trace)
        for b in range(len(trace.attentions) - 1, -1, -1):
            m = (grads[b] * trace.attentions[b].detach()).clamp(min=0).mean(1)
            v = adapter.mix(v, b, m + adapter.identity_like(m))
        return v, trace.logits.detach(), target
