"""AttCAT (Qiang et al., NeurIPS 2022, "AttCAT: Explaining Transformers via Attentive Class
Activation Tokens"; public code: github.com/qiangyao1988/AttCAT, `generate_TransCAM` in
BERT_explainability/modules/BERT/ExplanationGenerator.py and the notebooks).

For each layer l, the class activation token of token i is its hidden state times the gradient of
the target logit with respect to it, summed over the hidden units; it is weighted by the attention
token i receives in that layer, and the layers are summed:

    CAT^l_i    = Σ_d h^l_{i,d} · ∂y_c/∂h^l_{i,d}
    ᾱ^l_i      = mean_h mean_q A^l_h[q, i]              (the attention column of key token i)
    AttCAT_i   = Σ_l ᾱ^l_i · CAT^l_i

Choices, each checked against the public code:

* h^l are the tokens *entering* layer l (the public code pairs `hidden_states[l]` of Hugging Face's
  output, whose entry 0 is the embedding output, with the attention of `encoder.layer[l]`), for
  l = 0..L-1: the embedding output enters, the last layer's output does not. The gradient is the
  full ∂y_c/∂h^l (through the residual paths too), of the raw (pre-softmax) logit.
* ᾱ^l averages the heads, then the query rows (the public code's `att.mean(0).mean(0)` on one
  sample's (H, N, N) map): all N rows for ViT, the valid (non-padding) rows for text (the public
  code has no padding; with it, padded query rows would change the mean), the window's rows for
  Swin (a token is a key only inside its window).
* Every layer is summed; the public code's `start_layer` argument is unused, so there is no option.
* Scores are signed (no ReLU or absolute value), as in the public code. ViT's class token and
  text's special tokens get a score like any token (ViT's is dropped when the map is laid on the
  grid); padding gets 0 (its gradient is 0).
* Batches: the public code is batch-1 (`squeeze(0)`); every quantity here is per sample.
* Swin (no public version): each layer's scores lie on its stage's grid and are brought to the
  first stage's grid by the adapter's patch-merging convention (each merged token's score split
  evenly among the four tokens it merged), then summed over layers. ViT and BERT keep one token
  grid, so nothing changes there.

Cost: one forward and one backward.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .base import Explainer, register, select_target, target_gradients


def key_attention(adapter, trace, block: int) -> torch.Tensor:
    """ᾱ: (B, N_block) the head- and query-mean attention each token receives as a key in `block`."""
    a = trace.attentions[block].detach().mean(1)  # (…, N_query, N_key)
    if adapter.family == "swin":
        from ..models.swin import _from_windows

        _, blk = adapter.blocks[block]
        gh, gw = adapter.block_grid(block)
        grid = _from_windows(a.mean(1).unsqueeze(-1), tuple(blk.window_size), tuple(blk.shift_size), gh, gw)
        return grid.reshape(grid.shape[0], gh * gw)
    mask = trace.extras.get("attention_mask")
    if mask is not None:
        valid = mask.to(a.dtype)
        return (a * valid[:, :, None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
    return a.mean(1)


@register
class AttCAT(Explainer):
    name = "attcat"
    description = "AttCAT (Qiang et al. NeurIPS 2022): Σ_l mean_h,q(A^l)[:, i] · Σ_d (h^l ⊙ ∂y_c/∂h^l)_i, h^l the tokens entering layer l."
    class_specific = True
    needs = frozenset({"attention"})

    def scores(self, adapter, x, target):
        trace = adapter.run(x)
        inputs = trace.extras.get("block_inputs")
        if inputs is None:
            raise UserError(f"Method 'attcat' is not defined on {adapter.family}: the adapter does not expose the tokens entering each block.")
        target = select_target(trace.logits, target)
        grads = target_gradients(trace.logits, target, list(inputs))
        total = None
        for b, (h, g) in enumerate(zip(inputs, grads)):
            cat = (h.detach() * g.detach()).sum(-1).reshape(h.shape[0], -1)  # (B, N_block)
            s = key_attention(adapter, trace, b) * cat
            if adapter.family == "swin":
                s = adapter.to_grid(s, 0)
            total = s if total is None else total + s
        return total, trace.logits.detach(), target
