"""TokenTM (Wu, Duan, Kang, Tang, Yan, CVPR 2024, "Token Transformation Matters: Towards Faithful
Post-hoc Explanation for Vision Transformer", arXiv 2403.14552). The authors published no code.

Attention weights say how much of token j a token i takes; TokenTM adds how the sublayer changed
token j before it was taken: its length (L2 norm) and its direction (cosine to the original).
For one transformation e_j -> ẽ_j of the N tokens of a sample:

    r_j    = ‖ẽ_j‖ / ‖e_j‖                                   (length change)
    NECC_j = exp(cos(e_j, ẽ_j)) / Σ_k exp(cos(e_k, ẽ_k))     (normalised exponential cosine
                                                               correlation: a softmax over tokens)
    W      = diag(r_j · NECC_j)                              (transformation weights)

The contribution map C (N x N: how much each input token makes up each token of the current layer)
starts at the input tokens' lengths and is updated by every sublayer, skip connection included:

    C_0   = diag(‖e^0_1‖, …, ‖e^0_N‖)                        (initialisation rule)
    U_att = I + (Ā W_att) ⊙ G,   Ā = E_h[A_h],  G = E_h[(∂y_t/∂A_h)⁺]
    U_mlp = I + W_mlp                                        (the MLP moves no token: diagonal)
    C_l   = U_mlp U_att C_{l-1}                              (aggregation rule, l = 1..L)

and the explanation is the classifier's row of C_L (ViT/DeiT and BERT: the class token's row; Swin:
the mean of the last stage's rows), read over the input tokens. The row is carried down the blocks
(v ← v·U) and never built as a matrix, so Swin's windows and patch merging go through the adapters'
`mix` like every other attention method. y_t is the raw (pre-softmax) logit of the target class.

Choices (the stored copies of the paper available here give its abstract and third-party summaries,
not the method section in full; see below for the one independent re-implementation found). Each
choice below is ours, with the alternative named; where possible a test in tests/test_tokentm.py
fails if the choice is changed:

* What "before" and "after" are. Attention: e_j is the block's input token (the residual stream,
  before the LayerNorm) and ẽ_j is what the attention sublayer alone makes of token j, unmixed:
  LayerNorm, value projection (with bias) for all heads, output projection (with bias), ViT's
  layer scale; i.e. the sublayer's output at a query that attended only to j in every head, so that
  the sublayer's output is exactly Σ_j A_ij ẽ_j when the heads agree. ẽ_j must be in the residual
  stream's space for the cosine to mean anything (the value space has other coordinates), and e_j
  is the residual token because the I in U_att carries exactly that token: r_j weighs what the
  sublayer adds against what the skip keeps. MLP: e_j is the token entering the MLP sublayer (the
  residual stream after attention; BERT: after the attention LayerNorm) and ẽ_j the MLP sublayer's
  output before the residual add. Not chosen: the residual stream after the sublayer (skip included)
  as ẽ, which would count the skip twice next to the I; the LayerNorm output as e.
* NECC normalises over the tokens of one sample: all N tokens with the class token (ViT), the valid
  (non-padding) tokens (BERT; padding gets weight 0), all tokens of the block's grid (Swin: the
  transformation is per token, so the normalisation is not cut into windows).
* The gradient term: mean over heads of the ReLU of ∂y_t/∂A (ReLU per head, then the mean), times
  the head-mean attention times W: G multiplies (Ā W) entrywise. Not chosen: E_h[(∇A_h ⊙ A_h)⁺] W.
* 0/0: a token of zero length has r_j = 0 (it carries nothing to scale); cos = 0 when either token
  has zero length (no directional correlation), so NECC stays a softmax of finite numbers. All-black
  and constant images therefore give finite maps (ViT tokens also carry the position embedding).
* The post-sublayer LayerNorms of BERT (post-norm) and the final LayerNorm are not measured: TokenTM
  measures the attention and MLP transformations only.
* Swin's patch merging (four tokens into one) has no single before/after pair: a merged token's row
  entry goes to its four children in equal quarters (the adapters' `to_grid`, as for rollout), and
  C_0 uses the lengths of the tokens entering the first block.
* Nothing is normalised along the way (no row normalisation of U); the map is the raw row of C_L.
  The class token's own column is dropped when the map is laid on the grid (as for every method).

Compared with the one independent re-implementation found: `transform_TokenTM` in the LibraGrad
authors' NightMachinery/decompv-libragrad-v1 (decompv/x/ds/utils.py). tests/test_tokentm.py runs that
function, taken out of the file as written, on the tensors its pipeline records (plain gradients)
from a forward of the same float64 timm ViT. Given its before/after tokens, ours equals it: max
relative difference 1.6e-9 as written, all of it from its ε = 1e-8 in ‖ẽ‖/(‖e‖+ε) (bound
2·depth·ε/min‖e‖ = 2.1e-8), and ≤ 1e-15 with ε set to 0. So C_0, NECC (a softmax over all N tokens,
class token included), W, Ā, the head mean of the ReLU'd gradient of the raw target logit, U_att,
U_mlp, the order of the products and the class token's row are the same. What differs, on purpose:
* ẽ (the first choice above): theirs is the residual stream after each sublayer, skip included
  (attention: the token at position j after the mixing, e_j + Σ_k A_jk·(sublayer of e_k); MLP: the
  block output); ours each sublayer's own output, unmixed and without the skip, which the I in U
  already carries. The e's are the same. On the embedded ViT (4 noise and 2 blob images) the two
  maps' patch scores have Spearman 0.81-0.94, top-19 overlap 0.68-0.95, and differ by up to 0.49
  once each is scaled to its maximum.
* 0/0: theirs gives a zero-length e_j the weight ‖ẽ_j‖·1e8·NECC_j (from ε), ours 0. Its cosine
  (F.cosine_similarity, norms clamped at 1e-8) is ours but for tokens shorter than 1e-8.
* Scope: theirs runs only on models with a class token and always reads row 0; ours reads each
  adapter's row (DeiT-distilled: the mean of the class and distillation rows; average pooling; Swin;
  BERT). Their C_0 and block 0's e are the tokens before timm's `norm_pre` (identity on ViT/DeiT,
  a LayerNorm on CLIP towers), ours the tokens entering block 0.
* Gradient: theirs is whatever gradient the run's LibraGrad "gradient brand" gives; plain autograd
  (their default brand NG) is ours, and is what the comparison uses.

Batched and batch-invariant: each sample's weights, gradients and row use only that sample (the
target logits are summed over the batch before the single backward). Cost: one forward that also
keeps each sublayer's tokens (plus one output projection per block), one backward to the attention
maps, and per block O(N·D + N²) for the weights and the row.
"""
from __future__ import annotations

import torch

from ..errors import UserError
from .base import Explainer, register, select_target, target_gradients


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, N, D) or Swin's (B, H, W, D) -> (B, N, D)."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def lengths(t: torch.Tensor) -> torch.Tensor:
    """L(e): the L2 norm of every token, (B, N)."""
    return _flat(t).norm(dim=-1)


def transformation_weights(before: torch.Tensor, after: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """w_j = ‖ẽ_j‖/‖e_j‖ · softmax_j(cos(e_j, ẽ_j)) over the valid tokens of each sample, (B, N).

    0/0 cases: the ratio is 0 where ‖e_j‖ = 0, the cosine 0 where either length is 0; invalid
    (padding) tokens get weight 0 and take no part in the softmax."""
    e, f = _flat(before), _flat(after)
    le, lf = e.norm(dim=-1), f.norm(dim=-1)
    ratio = torch.where(le > 0, lf / torch.where(le > 0, le, torch.ones_like(le)), torch.zeros_like(le))
    den = le * lf
    cos = torch.where(den > 0, (e * f).sum(-1) / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    necc = cos.masked_fill(~valid, float("-inf")).softmax(-1)
    return ratio * necc * valid.to(ratio.dtype)


@register
class TokenTM(Explainer):
    name = "tokentm"
    needs = frozenset({"attention", "sublayer_tokens"})
    description = ("TokenTM (Wu et al. CVPR 2024): C ← (I+W_mlp)(I+(Ā·W_att)⊙E_h∇A⁺)C from C_0 = diag‖e⁰‖, "
                   "W = diag(‖ẽ‖/‖e‖ · softmax cos(e, ẽ)).")
    class_specific = True

    def scores(self, adapter, x, target):
        trace = adapter.run(x, sublayers=True)
        subs = trace.extras.get("sublayers")
        if not subs:
            raise UserError(f"Method 'tokentm' is not defined on {adapter.family} models: the adapter does not expose each sublayer's tokens.")
        target = select_target(trace.logits, target)
        grads = target_gradients(trace.logits, target, trace.attentions)
        mask = trace.extras.get("attention_mask")
        v = adapter.readout(trace)
        for b in range(len(trace.attentions) - 1, -1, -1):
            s = subs[b]
            valid = self._valid(mask, s["attn_in"])
            w_mlp = transformation_weights(s["mlp_in"], s["mlp_out"], valid)
            w_att = transformation_weights(s["attn_in"], s["attn_out"], valid)
            v = self._on_grid(adapter, v, b) * (1.0 + w_mlp)
            att = trace.attentions[b].detach()
            m = att.mean(1) * grads[b].detach().clamp(min=0).mean(1) * self._per_key(adapter, b, w_att)
            v = adapter.mix(v, b, m + adapter.identity_like(m))
        v = self._on_grid(adapter, v, 0) * lengths(subs[0]["attn_in"])
        return v, trace.logits.detach(), target

    @staticmethod
    def _valid(mask, tokens: torch.Tensor) -> torch.Tensor:
        flat = _flat(tokens)
        if mask is None:
            return torch.ones(flat.shape[:2], dtype=torch.bool, device=flat.device)
        return mask.bool()

    @staticmethod
    def _on_grid(adapter, v: torch.Tensor, block: int) -> torch.Tensor:
        """A row vector brought onto block `block`'s tokens (Swin: down through patch merging)."""
        if hasattr(adapter, "to_grid"):
            return adapter.to_grid(v, adapter.block_stage[block])
        return v

    @staticmethod
    def _per_key(adapter, block: int, w: torch.Tensor) -> torch.Tensor:
        """w (B, N_b) as a factor on the key columns of block `block`'s attention layout."""
        if hasattr(adapter, "layout_tokens"):
            return adapter.layout_tokens(w, block).unsqueeze(-2)  # (B*nW, 1, n)
        return w.unsqueeze(-2)  # (B, 1, N)
