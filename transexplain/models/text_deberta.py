"""DeBERTa-v2 (and v3, the same code in transformers) in the text adapter's recorded forward.

DeBERTa's disentangled attention adds two relative-position terms to the content logits:

    logits_ij = (q_i · k_j + q_i · k^r_{δ(i,j)} + k_j · q^r_{δ(j,i)}) / sqrt(d · scale_factor)

with k^r, q^r the (shared or own) key / query projections of the relative position embeddings
(`encoder.rel_embeddings`, LayerNorm'd when `norm_rel_ebd` says so), δ the bucketed relative
position (`build_relative_position`, transformers' own function) shifted into [0, 2·span) and
scale_factor = 1 + [c2p] + [p2c]. The adapter records them as transformers computes them:

    content = q @ (kᵀ / scale)                              matmul (tag ("attn_scores", b))
    c2p     = gather(q @ k^rᵀ, δ) / scale                   matmul, move (gather), pass
    p2c     = gather(k @ q^rᵀ, δ')ᵀ / scale                 matmul, move (gather + transpose), pass
    logits  = content + (c2p + p2c)                         add, add

Relevance through the relative terms: each is a bilinear product like the content term and gets
the same rule (the rule set's matmul rule: gradient x input on both factors, halved in the classic
and "ours" rule sets; ε-rule then ½/½ in AttnLRP). The position factor k^r / q^r does not depend on
the input, so its half is absorbed, as added constants (position embeddings, masks) absorb theirs.
The gather is an index op whose relevance goes back by its adjoint (a scatter-add).

The attention mask is DeBERTa's pairwise one (query and key both valid), entered as an additive
constant of finfo.min (rounds to exactly finfo.min, as transformers' masked_fill); the embedding
output is already multiplied by the mask inside `DebertaV2Embeddings`. Not covered (refused):
the convolution layer of the larger v2 models (`conv_kernel_size > 0`).
"""
from __future__ import annotations

import torch

from ..errors import UserError


def check(model) -> None:
    """Refuse DeBERTa configurations the recorded forward does not reproduce."""
    cfg = model.config
    if getattr(cfg, "conv_kernel_size", 0) > 0:
        raise UserError("This text model is not supported: the DeBERTa-v2 model has a convolution layer "
                        f"(conv_kernel_size={cfg.conv_kernel_size}) after its first block, which the text adapter does not record.")
    if getattr(model.deberta, "z_steps", 0) > 1:
        raise UserError("This text model is not supported: the DeBERTa-v2 model re-runs its last layer (z_steps > 1).")


def pair_mask_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, N, N) additive mask: 0 where query and key are both tokens, finfo.min elsewhere."""
    m = attention_mask.to(dtype)
    pair = m[:, None, :, None] * m[:, None, None, :]
    return (1.0 - pair) * torch.finfo(dtype).min


def relative_context(encoder, h: torch.Tensor) -> dict | None:
    """What every layer's relative terms share in one run: the relative positions and embeddings."""
    enc = encoder.encoder
    if not getattr(enc, "relative_attention", False):
        return None
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position

    rel_pos = build_relative_position(h, h, bucket_size=enc.position_buckets, max_position=enc.max_relative_positions)
    return {"rel_pos": rel_pos[0].to(h.device), "rel_emb": enc.get_rel_embedding()}


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(R, H·d) -> (1, H, R, d)."""
    return t.reshape(1, t.shape[0], heads, -1).transpose(1, 2)


def attention_logits(tape, sa, q, k, rel: dict | None, b: int) -> torch.Tensor:
    """The recorded pre-mask attention logits of one DisentangledSelfAttention: (B, H, N, N)."""
    from transformers.models.deberta_v2.modeling_deberta_v2 import scaled_size_sqrt

    kinds = sa.pos_att_type if rel is not None else []
    scale_factor = 1 + ("c2p" in kinds) + ("p2c" in kinds)
    scale = scaled_size_sqrt(q, scale_factor).to(dtype=q.dtype, device=q.device)  # float32 sqrt, as transformers
    n_batch, heads, n_tok, _ = q.shape
    kt = tape.move(lambda t: t.transpose(-2, -1), k)
    kt = tape.passthrough(lambda t: t / scale, kt)
    content = tape.matmul(q, kt, tag=("attn_scores", b))
    if not kinds:
        return content
    span = sa.pos_ebd_size
    rel_emb = rel["rel_emb"][: span * 2]
    rel_pos = rel["rel_pos"]
    terms = []
    if "c2p" in kinds:
        pos_key = _heads((sa.key_proj if sa.share_att_key else sa.pos_key_proj)(rel_emb), heads)
        pos_key_t = pos_key.transpose(-2, -1).expand(n_batch, -1, -1, -1)
        idx = torch.clamp(rel_pos + span, 0, span * 2 - 1).expand(n_batch, heads, n_tok, n_tok)
        c2p = tape.matmul(q, pos_key_t, tag=("attn_c2p", b))
        c2p = tape.move(lambda t: torch.gather(t, -1, idx), c2p)
        terms.append(tape.passthrough(lambda t: t / scale, c2p))
    if "p2c" in kinds:
        pos_query = _heads((sa.query_proj if sa.share_att_key else sa.pos_query_proj)(rel_emb), heads)
        pos_query_t = pos_query.transpose(-2, -1).expand(n_batch, -1, -1, -1)
        idx_p = torch.clamp(-rel_pos + span, 0, span * 2 - 1).expand(n_batch, heads, n_tok, n_tok)
        p2c = tape.matmul(k, pos_query_t, tag=("attn_p2c", b))
        p2c = tape.move(lambda t: torch.gather(t, -1, idx_p).transpose(-2, -1), p2c)
        terms.append(tape.passthrough(lambda t: t / scale, p2c))
    rel_logits = terms[0] if len(terms) == 1 else tape.add(terms[0], terms[1])
    return tape.add(content, rel_logits)
