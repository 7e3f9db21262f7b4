"""What every model adapter gives the explainers: a recorded forward and token-space operators.

An adapter wraps an unmodified model. `run` re-runs its forward through an LRP `Tape` and returns
the logits with each block's attention probabilities (heads on dim 1, in the adapter's own layout:
(B, H, N, N) for ViT, one matrix per window for Swin). `readout` and `mix` let a method carry a
row vector over tokens down the blocks (v ← v·M_b) without ever building a dense token x token
product, and `to_token_map` turns the final vector into a (B, grid_h, grid_w) map.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..lrp import Tape


@dataclass
class Trace:
    logits: torch.Tensor
    attentions: list  # per block, heads on dim 1
    tape: Tape
    input: torch.Tensor
    extras: dict = field(default_factory=dict)

    def release_graph(self) -> "Trace":
        """Detach every tensor this trace holds (logits, attentions, extras), in place: the values stay,
        the autograd graph behind them can be freed. For an explainer that has taken its gradients
        and still reads the trace while it runs more forwards (Beyond Intuition's α passes)."""

        def cut(v):
            if isinstance(v, torch.Tensor):
                return v.detach()
            if isinstance(v, (list, tuple)):
                return type(v)(cut(t) for t in v)
            if isinstance(v, dict):
                return {k: cut(t) for k, t in v.items()}
            return v

        self.logits = cut(self.logits)
        self.attentions = cut(self.attentions)
        self.extras = cut(self.extras)
        return self


#: What an adapter can offer an explainer, with the words a refusal uses for it. An explainer
#: declares the capabilities it needs (`Explainer.needs`); the method x architecture matrix and
#: every refusal come from comparing the two sets (`missing_capabilities`).
CAPABILITIES = {
    "attention": "each block's attention probabilities, differentiable",
    "relevance": "a recorded forward that relevance rules can walk back",
    "input_gradient": "gradients with respect to the model's input (pixels or token embeddings)",
    "layer_readout": "a classifier that can read every layer's tokens",
    "ln_stats": "each block's LayerNorm input statistics",
    "class_token": "a class token whose row the classifier reads",
    "sublayer_tokens": "each block's tokens before and after its attention and MLP sublayers",
}


def missing_capabilities(needs, offers) -> list:
    """The capabilities in `needs` that `offers` lacks, in a stable order."""
    return sorted(set(needs) - set(offers))


class EncoderAdapter:
    """Base class; subclasses implement `run`, `readout`, `mix`, `to_token_map`."""

    family = "encoder"
    #: capabilities (keys of CAPABILITIES) this architecture offers the explainers
    offers: frozenset = frozenset(CAPABILITIES)
    #: GradCAM head weights from the mean of ∇A over the full matrix (text) or the readout row (vision)
    gradcam_full_matrix = False

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    def with_model(self, model: torch.nn.Module) -> "EncoderAdapter":
        """The same adapter over another copy of the model (e.g. cast to another precision)."""
        return type(self)(model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    num_blocks: int
    num_classes: int

    def run(self, x: torch.Tensor, record: bool = False) -> Trace:
        raise NotImplementedError

    def readout(self, trace: Trace) -> torch.Tensor:
        """The row vector that reads the classifier's input off the last block's tokens."""
        raise NotImplementedError

    def mix(self, v: torch.Tensor, block: int, mats: torch.Tensor) -> torch.Tensor:
        """v ← v · M for block `block`; `mats` has the block's attention layout without the head dim."""
        raise NotImplementedError

    def to_token_map(self, v: torch.Tensor, batch=None) -> torch.Tensor:
        """Scores of the content tokens on their grid, (B, grid_h, grid_w); `batch`: the input they
        explain (text adapters read its padding from it)."""
        raise NotImplementedError

    def identity_like(self, mats: torch.Tensor) -> torch.Tensor:
        n = mats.shape[-1]
        return torch.eye(n, dtype=mats.dtype, device=mats.device).expand_as(mats)


class ClassTokenReadout:
    """Readout and mixing for encoders whose classifier reads token 0 (ViT's CLS, BERT's [CLS])
    and whose attention is one dense (B, N, N) matrix per block."""

    def readout(self, trace: Trace) -> torch.Tensor:
        n_batch, n_tok = trace.attentions[-1].shape[0], trace.attentions[-1].shape[-1]
        v = torch.zeros(n_batch, n_tok, dtype=trace.logits.dtype, device=trace.logits.device)
        v[:, 0] = 1.0
        return v

    def mix(self, v, block, mats):
        return torch.bmm(v.unsqueeze(1), mats).squeeze(1)
