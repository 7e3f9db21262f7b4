"""Attention-only methods: raw attention of the last block, and attention rollout."""
from __future__ import annotations

import torch

from .base import Explainer, register


def _check_start(start_layer: int, num_blocks: int):
    from ..errors import UserError

    if not 0 <= start_layer < num_blocks:
        raise UserError(f"start_layer={start_layer} is out of range: the model has {num_blocks} blocks (0..{num_blocks - 1}).")


@register
class RawAttention(Explainer):
    name = "raw_attention"
    needs = frozenset({"attention"})
    description = "Head-averaged attention of the last block, read off the classifier's row."

    def scores(self, adapter, x, target):
        with torch.no_grad():
            trace = adapter.run(x)
        last = len(trace.attentions) - 1
        v = adapter.mix(adapter.readout(trace), last, trace.attentions[last].mean(1))
        return v, trace.logits, target


@register
class Rollout(Explainer):
    name = "rollout"
    needs = frozenset({"attention"})
    description = "Attention rollout (Abnar & Zuidema 2020): product of row-normalised (mean-head A + I)."

    @classmethod
    def defaults(cls):
        # None: the model's own default, `adapter.default_rollout_start_layer` (the reference's
        # protocols: 1 for the vision models, 0 for BERT); 1 for an adapter that does not say
        return {"start_layer": None}

    def scores(self, adapter, x, target):
        with torch.no_grad():
            trace = adapter.run(x)
        start = self.options["start_layer"]
        if start is None:
            # clamped to the last block, so that a one-block model still has one layer to roll out
            start = min(getattr(adapter, "default_rollout_start_layer", 1), len(trace.attentions) - 1)
        _check_start(start, len(trace.attentions))
        v = adapter.readout(trace)
        for b in range(len(trace.attentions) - 1, start - 1, -1):
            m = trace.attentions[b].mean(1)
            m = m + adapter.identity_like(m)
            v = adapter.mix(v, b, m / m.sum(-1, keepdim=True))
        return v, trace.logits, target
