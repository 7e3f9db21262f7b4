"""LeGrad (Bousselham et al. 2024, "LeGrad: An Explainability Method for Vision Transformers via
Feature Formation Sensitivity"; public code: the `legrad-torch` package, version 1.1).

For each layer l, the model's own classifier reads that layer's output tokens Z^l (the "logit lens":
the final norm and head applied to the intermediate tokens), giving a score s^l_c for the target
class c. LeGrad's signal is the gradient of s^l_c with respect to the same layer's attention map A^l:

    E^l = mean_h mean_i ReLU(∂s^l_c / ∂A^l)[h, i, :]        (one score per key token)
    E   = mean_{l >= start_layer} E^l

Choices, each checked against the paper and the package's source:

* The readout of an intermediate layer is the one the model applies to its last layer: ViT/DeiT
  the final LayerNorm, the class token, `fc_norm` and the head (the paper's [CLS] read through the
  final norm and classifier); BERT the pooler and classifier on the layer's [CLS]; Swin the final
  norm, the token mean and the head. The score is the raw (pre-softmax) logit of the target class.
  The package's open_clip (CLIP) path instead scores the *mean of all tokens* through `ln_post` and
  the projection, L2-normalised, against a text embedding: the same method read through a CLIP's
  zero-shot classifier; a classifier's own head is what plays that role here.
* Only ∂s^l/∂A^l of the same layer enters E^l (not the attention maps of earlier layers), as in
  the package. ReLU before the head mean, as in both.
* The mean over query rows runs over all rows (ViT: all N tokens, class token included, as the
  package's `grad.mean(dim=1).mean(dim=1)`), over the valid (non-padding) rows for text, and over
  the window's rows for Swin. With a class-token readout only the class token's row has a nonzero
  gradient, so the mean is that row divided by the row count.
* Layers are averaged (the package sums, then min-max normalises: the same heatmap); the class
  token's column is dropped when the map is laid on the grid.
* `start_layer` (default 0: every layer, the paper's "aggregate over all layers"; negative counts
  from the end, like the package's `layer_index`, whose default -2 keeps only the last two layers).
* Swin: only the blocks of the last stage are read (the final norm and head only take tokens of
  that width; earlier stages have other widths after patch merging), so the map lies on the last
  stage's grid and is spread evenly onto the first stage's grid by `to_token_map`. Window maps are
  put back on the grid (the shift undone). The package has no Swin path.
* Option `libragrad` (default false): the gradients are LibraGrad's (`captum_methods.libragrad_context`;
  attention probabilities, LayerNorm's σ and GELU's gate constant in the backward, the readout's
  norm included).
* The package's SigLIP "correction" (zeroing pixels that an empty prompt also highlights) needs a
  text prompt and is not part of the classifier definition; it is left out.

Batched and batch-invariant: every score is summed over the batch before the gradient, and no
sample's score depends on another's. Cost: one forward and one partial backward per layer, each
through one block and the head only (together about one backward).
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .base import Explainer, register, select_target


def _layer_logits(adapter, trace, layer: int) -> torch.Tensor:
    """(B, classes): the model's classifier applied to the output tokens of block `layer`."""
    hidden = trace.extras["hidden"][layer]
    m = adapter.model
    if adapter.family == "vit":
        from ..lrp import Tape

        return adapter._head(Tape(record=False), hidden)
    if adapter.family == "swin":
        from ..lrp import Tape

        tape = Tape(record=False)  # the adapter's own ops, through a tape so that `libragrad` reaches the norm
        h = tape.move(lambda t: t.flatten(1, 2), tape.passthrough(m.norm, hidden))
        pooled = tape.passthrough(m.head.drop, tape.pool_mean(h, 1))
        return tape.passthrough(m.head.flatten, tape.linear(pooled, m.head.fc))
    if adapter.family == "bert":
        from ..lrp import Tape

        return adapter._head(Tape(record=False), hidden)
    raise UserError(f"Method 'legrad' is not defined on {adapter.family}: it needs a classifier that can read every layer's tokens.")


def _readable_layers(adapter) -> list:
    """Blocks whose output the final classifier can read (Swin: the last stage only)."""
    if adapter.family == "swin":
        last = adapter.block_stage[-1]
        return [b for b in range(adapter.num_blocks) if adapter.block_stage[b] == last]
    return list(range(adapter.num_blocks))


@register
class LeGrad(Explainer):
    name = "legrad"
    needs = frozenset({"attention", "layer_readout"})
    description = ("LeGrad (Bousselham et al. 2024): mean over layers of E_h,i[ReLU(∂s^l/∂A^l)], s^l the head read on "
                   "layer l; option libragrad=true: LibraGrad's backward.")
    class_specific = True

    @classmethod
    def defaults(cls) -> dict:
        return {"start_layer": 0, "libragrad": False}

    def layer_logits(self, adapter, trace, layer: int) -> torch.Tensor:
        """The per-layer readout (a method so that a comparison can swap in another readout)."""
        return _layer_logits(adapter, trace, layer)

    def scores(self, adapter, x, target):
        from .captum_methods import libragrad_context

        with libragrad_context(self.options):
            return self._scores(adapter, x, target)

    def _scores(self, adapter, x, target):
        trace = adapter.run(x)
        if "hidden" not in trace.extras:
            raise UserError(f"Method 'legrad' is not defined on {adapter.family}: the adapter does not expose each layer's tokens.")
        target = select_target(trace.logits, target)
        n_blocks = len(trace.attentions)
        start = int(self.options["start_layer"])
        if start < 0:
            start += n_blocks
        if not 0 <= start < n_blocks:
            raise UserError(f"start_layer must lie in -{n_blocks}..{n_blocks - 1} for this model's {n_blocks} layers, got {self.options['start_layer']}.")
        layers = [b for b in _readable_layers(adapter) if b >= start]
        if not layers:
            raise UserError(f"start_layer {self.options['start_layer']} leaves no layer the classifier can read on {adapter.family}.")
        total = None
        with torch.enable_grad():
            for b in layers:
                logits = self.layer_logits(adapter, trace, b)
                score = logits.gather(1, target.view(-1, 1)).sum()
                (grad,) = torch.autograd.grad(score, trace.attentions[b], retain_graph=True)
                e = self._per_key(adapter, trace, b, grad.detach().clamp(min=0).mean(1))
                total = e if total is None else total + e
        return total / len(layers), trace.logits.detach(), target

    @staticmethod
    def _per_key(adapter, trace, block: int, g: torch.Tensor) -> torch.Tensor:
        """Head-mean gradient (…, N_query, N_key) -> its mean over query rows, one row per sample."""
        if adapter.family == "swin":
            from ..models.swin import _from_windows

            _, blk = adapter.blocks[block]
            gh, gw = adapter.block_grid(block)
            w = g.mean(1).unsqueeze(-1)  # (B*nW, n, 1)
            grid = _from_windows(w, tuple(blk.window_size), tuple(blk.shift_size), gh, gw)
            return grid.reshape(grid.shape[0], gh * gw)
        mask = trace.extras.get("attention_mask")
        if mask is not None:
            valid = mask.to(g.dtype)
            return (g * valid[:, :, None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        return g.mean(1)
