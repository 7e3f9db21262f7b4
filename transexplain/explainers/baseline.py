"""The random baseline: what a method must beat to mean anything."""
from __future__ import annotations

import torch

from .base import Explainer, content_seed, register


@register
class RandomBaseline(Explainer):
    name = "random"
    description = "Uniform random token scores (sanity baseline), seeded by the image content."

    @classmethod
    def defaults(cls):
        return {"seed": 0}

    def scores(self, adapter, x, target):
        with torch.no_grad():
            trace = adapter.run(x)
        template = adapter.readout(trace)
        rows = []
        for sample in x:  # one generator per image keeps the map independent of the batch
            gen = torch.Generator().manual_seed(content_seed(sample, self.options["seed"]))
            rows.append(torch.rand(template.shape[1], generator=gen, dtype=torch.float64))
        v = torch.stack(rows).to(template.dtype).to(template.device)
        return v, trace.logits, target
