"""Beyond Intuition (Chen et al., TMLR 2023, "Beyond Intuition: Rethinking Token Attributions
inside Transformers"; public code: github.com/jiaminchen-1031/transformerinterp, `generate_ours`
(head-wise, "Ours-H") and `generate_ours_c` (token-wise, "Ours-T") in ViT/baselines/ViT/
ViT_explanation_generator.py and BERT/.../ExplanationGenerator.py).

The attribution of token j splits, by the chain rule, into an *attention perception* part P (how
the tokens mix into the token the classifier reads) and a *reasoning feedback* part W (how the
classifier's output depends on the last attention map):

    score_j = W_{0j} · P_{0j}                                        (0: the class token's row)

Attention perception: P = (I + Ã^{L}) (I + Ã^{L-1}) ··· (I + Ã^{s}) over blocks s..L, with

    bt_h (head-wise):   Ã^b = Σ_h Î^b_h A^b_h,   I^b_h = mean_{j,k} |(A^b_h)ᵀ ∇A^b_h|_{jk},
                        Î^b_h = I^b_h / Σ_h' I^b_h'         (∇A^b_h = ∂y_c/∂A^b_h at the input)
    bt_t (token-wise):  Ã^b = (mean_h A^b_h) · diag(‖W_O v^b_j‖ / ‖z^b_j‖)
                        (v^b_j: token j's value vector, all heads concatenated, value bias
                        included; W_O the attention output projection's weight, no bias; z^b_j the
                        token entering block b, before its first norm for ViT, the layer input for
                        BERT)

Reasoning feedback (both): integrated gradients of the target logit with respect to the last
block's attention map along the straight path from a zero input, a left-and-right Riemann mean over
`steps` equally spaced α in [0, 1] (both ends included, as the public code's np.linspace):

    W = mean_h ReLU( (1/steps) Σ_α ∂y_c(α·x) / ∂A^L_h )

where α·x scales the normalised pixels (ViT) or the embedding output (BERT: the public code's
`alpha * embedding_output`).

Choices, each checked against the public code:

* P's row 0 is carried down the blocks as a row vector (v ← v + v·Ã^b, b = L..s, starting from the
  classifier's readout row), never as the N x N product: the same numbers as the public code's
  `R = R + Ã R` then `R[:, 0]`.
* `start_layer` (default 0: every block, the formula's product over all layers) is the first block
  included, 0-based; negative counts from the end. The public code includes blocks `nb >=
  start_layer - 1` and its scripts pass, for ViT-B, start_layer=4 (head-wise: our 3) and 7
  (token-wise: our 6); its BERT versions hard-code the last block only (head-wise: our -1) and the
  last four blocks (token-wise: our -4). These are per-model tuning, not part of the definition.
* Batches: the public code is batch-1 (its head weights are normalised over batch x heads and its
  `reshape(num_head, -1)` fails for B > 1); here Î is normalised per sample over the heads, which
  is the batch-1 result for every sample.
* Text: the mean over (j, k) in I_h runs over the valid (non-padding) tokens only (the public code
  has no padding). Only the ratio between heads enters, so the 1/N² of the mean cancels; padded
  key columns would otherwise enter through ∇A (which is nonzero at masked entries). Padding gets
  score 0 (its column of A is 0). The [CLS] score is kept (the BERT code zeroes R[0, 0] for display;
  the benchmark masks special tokens itself).
* The α = 1 gradient of the Riemann sum is the one already taken at the input for Î (the public
  code runs that forward twice).
* Guards that only act where the public code gives NaN: a sample whose heads all have I_h = 0
  gets Ã^b = 0 for that block (the block passes P through unchanged), and a token with ‖z_j‖ = 0
  gets weight 0.
* The public code's ViT has no LayerScale and no attention-output norm; for timm ViTs that have
  them, W_O is still the projection's weight alone (the definition's value-projection ratio).
* Swin is refused: W and P are read on the class token's row, and the public code's mean-pooling
  variant (MAE: the mean over rows of W ⊙ P) pairs the last block's key tokens with input tokens,
  an identity Swin's patch merging does not keep. (`needs` has "class_token".)

Cost: one forward and backward at the input (all blocks' ∇A), plus `steps - 1` forwards and
backwards for the integrated gradients (20 by default), plus (token-wise) one value projection per
block.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .base import Explainer, register, select_target, target_gradients


def _last_attention_gradient(adapter, x, alpha: float, target, last: int) -> torch.Tensor:
    """∂y_c/∂A^L at α·x, detached; the pass's graph is freed on return (one graph at a time)."""
    scaled = scaled_run(adapter, x, alpha)
    (g,) = target_gradients(scaled.logits, target, [scaled.attentions[last]])
    return g.detach()


def scaled_run(adapter, x, alpha: float):
    """The adapter's forward with the input scaled by `alpha`: the normalised pixels for images, the
    embedding output for text (the public BERT code's `alpha * embedding_output`)."""
    if getattr(adapter, "pixel_input", True):
        return adapter.run(x * alpha)
    enc = adapter.encoder
    last = getattr(enc, "embeddings_project", None) or enc.embeddings
    handle = last.register_forward_hook(lambda module, args, output: output * alpha)
    try:
        return adapter.run(x)
    finally:
        handle.remove()


def value_projection(adapter, block: int, z: torch.Tensor) -> torch.Tensor:
    """W_O v_j for every token: (B, N, D), the value vectors (all heads, value bias included) of the
    tokens `z` entering block `block`, through the output projection's weight (no bias)."""
    if adapter.family == "vit":
        blk = adapter.model.blocks[block]
        qkv = blk.attn.qkv(blk.norm1(z))  # (B, N, 3·H·d), laid out (q|k|v, head, dim)
        v = qkv[..., 2 * (qkv.shape[-1] // 3):]
        return v @ blk.attn.proj.weight.t()
    if adapter.family == "bert":
        layer = adapter.layers[block]  # BERT's module names (DistilBERT's and DeBERTa's layers as views)
        v = layer.attention.self.value(z)
        return v @ layer.attention.output.dense.weight.t()
    raise UserError(f"Method 'bt_t' is not defined on {adapter.family}: it needs each block's value vectors.")


def _valid_pairs(trace, like: torch.Tensor) -> torch.Tensor:
    """(B, 1, N, N) 1 where both tokens are valid (text padding excluded), else 0."""
    mask = trace.extras.get("attention_mask")
    if mask is None:
        return torch.ones_like(like[:, :1])
    m = mask.to(like.dtype)
    return (m[:, :, None] * m[:, None, :]).unsqueeze(1)


class _BeyondIntuition(Explainer):
    class_specific = True
    needs = frozenset({"attention", "class_token", "input_gradient"})
    tokenwise = False

    @classmethod
    def defaults(cls) -> dict:
        return {"start_layer": 0, "steps": 20}

    # -- attention perception: one block's Ã -------------------------------------------------
    def block_matrix(self, adapter, trace, block: int, grad: torch.Tensor | None) -> torch.Tensor:
        att = trace.attentions[block].detach()
        if self.tokenwise:
            with torch.no_grad():
                z = trace.extras["block_inputs"][block].detach()
                num = value_projection(adapter, block, z).norm(dim=-1)
                den = z.norm(dim=-1)
                ratio = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
            return att.mean(1) * ratio[:, None, :]
        imp = (att.transpose(-1, -2) @ grad).abs() * _valid_pairs(trace, att)
        imp = imp.sum((-2, -1))  # (B, H): the mean's 1/N² cancels in the normalisation
        total = imp.sum(1, keepdim=True)
        imp = torch.where(total > 0, imp / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(imp))
        return (imp[:, :, None, None] * att).sum(1)

    def scores(self, adapter, x, target):
        trace = adapter.run(x)
        target = select_target(trace.logits, target)
        n_blocks = len(trace.attentions)
        start, steps = int(self.options["start_layer"]), int(self.options["steps"])
        if start < 0:
            start += n_blocks
        if not 0 <= start < n_blocks:
            raise UserError(f"start_layer must lie in -{n_blocks}..{n_blocks - 1} for this model's {n_blocks} blocks, got {self.options['start_layer']}.")
        if steps < 2:
            raise UserError(f"steps must be at least 2 (the Riemann sum over α in [0, 1] with both ends), got {steps}.")
        if self.tokenwise and "block_inputs" not in trace.extras:
            raise UserError(f"Method {self.name!r} is not defined on {adapter.family}: the adapter does not expose the tokens entering each block.")
        last = n_blocks - 1
        wanted = [trace.attentions[b] for b in range(start if not self.tokenwise else last, n_blocks)]
        grads = [g.detach() for g in target_gradients(trace.logits, target, wanted)]
        grad_at = dict(zip(range(n_blocks - len(grads), n_blocks), grads))
        trace.release_graph()  # the α passes below need its values, not its graph
        # reasoning feedback: Riemann mean of ∂y_c/∂A^L over α·x, α = 0 .. 1 (α = 1: the gradient above)
        total = grad_at[last].clone()
        for alpha in torch.linspace(0.0, 1.0, steps, dtype=torch.float64)[:-1].tolist():
            total += _last_attention_gradient(adapter, x, alpha, target, last)
        w_mat = (total / steps).clamp(min=0).mean(1)
        readout = adapter.readout(trace)
        w = adapter.mix(readout, last, w_mat)
        # attention perception: the readout row of (I + Ã^L) ··· (I + Ã^s)
        v = readout
        for b in range(last, start - 1, -1):
            m = self.block_matrix(adapter, trace, b, grad_at.get(b))
            v = v + adapter.mix(v, b, m)
        return w * v, trace.logits.detach(), target


@register
class BeyondIntuitionHead(_BeyondIntuition):
    name = "bt_h"
    description = ("Beyond Intuition, head-wise (Chen et al. TMLR 2023): IG of ∇A^L (ReLU, head mean) ⊙ "
                   "CLS row of Π(I + Σ_h Î_h A_h), Î_h ∝ mean|A_hᵀ∇A_h|.")


@register
class BeyondIntuitionToken(_BeyondIntuition):
    name = "bt_t"
    description = ("Beyond Intuition, token-wise (Chen et al. TMLR 2023): IG of ∇A^L (ReLU, head mean) ⊙ "
                   "CLS row of Π(I + mean_h A_h · diag(‖W_O v_j‖/‖z_j‖)).")
    tokenwise = True
