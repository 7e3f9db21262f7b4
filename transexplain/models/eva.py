"""Adapter for timm's Eva (EVA-02 and the other `Eva` models): rotary position embeddings on q and
k, a SwiGLU MLP, optional sub-LayerNorms (after the attention's value mixing and inside the MLP),
layer scale, q/v biases without a k bias.

The forward is the ViT adapter's (patch embedding, prefix tokens, absolute position embedding,
class-token or average pooling, head); only the block differs, recorded with the tape's existing
kinds:

* Rotary embedding (a linear map of each token's q and k, fixed by its position):
  rope(x) = x ⊙ cos + P(x) ⊙ (s ⊙ sin), P a permutation of the head dimension (pair swap, or the
  half swap with `rotate_half`) and s its signs (timm's `rot` / `rope_rotate_half` is s ⊙ P(x)).
  Recorded as two constant element-wise scalings (pass-through), a permutation (move) and their
  sum (add), so relevance flows through it as through the linear map it is: the AttnLRP ε-rule
  on its two contributions x_i·cos_i and x_π(i)·s_i·sin_i, the gradient for CP-LRP and the
  gradient methods, and the addition rule (proportional split, rescaled per sample in ours) in
  the Chefer et al. rule sets. Class and register tokens are left unrotated by timm: they get
  cos = 1, sin = 0, which computes the same numbers.
* SwiGLU gate: act(x W_g) ⊙ (x W_x) (timm's SwiGLU, or GluMlp's packed fc1 halves), a product of two activations, recorded as the bilinear
  product it is (a 1x1 matmul per hidden unit): AttnLRP's uniform ½/½ split, and in the Chefer
  et al. rule sets the rule of the other products (Q·Kᵀ, A·V): gradient × input on each factor,
  halved — also a ½/½ split of each unit's relevance. SiLU itself is a pass-through.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..lrp import Tape
from .base import CAPABILITIES
from .vit import ViTAdapter, _refuse, read_geometry


class _QKVWithBias:
    """A fused qkv linear without bias (weight shared) with the concatenated q, k (zero) and v biases."""

    def __init__(self, attn: nn.Module):
        self.weight = attn.qkv.weight
        k_bias = attn.k_bias if attn.k_bias is not None else torch.zeros_like(attn.q_bias)
        self.bias = torch.cat((attn.q_bias, k_bias.to(attn.q_bias.dtype), attn.v_bias))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def elementwise_product(tape: Tape, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a ⊙ b recorded as a bilinear product (one 1x1 matmul per entry), so each rule set gives it
    the rule of its products."""
    shape = a.shape
    a1 = tape.move(lambda t: t.reshape(*shape, 1, 1), a)
    b1 = tape.move(lambda t: t.reshape(*shape, 1, 1), b)
    return tape.move(lambda t: t.reshape(shape), tape.matmul(a1, b1))


def _rotation(head_dim: int, half: bool, device):
    """(permutation index, signs) with timm's rot(x) = signs ⊙ x[..., perm]."""
    idx = torch.arange(head_dim, device=device)
    if half:  # rope_rotate_half: [-x_{d/2..}, x_{..d/2}]
        perm = torch.cat([idx[head_dim // 2:], idx[:head_dim // 2]])
        signs = torch.cat([-torch.ones(head_dim // 2), torch.ones(head_dim // 2)])
    else:  # rot: [-x1, x0, -x3, x2, ...]
        perm = idx.reshape(-1, 2).flip(-1).reshape(-1)
        signs = torch.tensor([-1.0, 1.0]).repeat(head_dim // 2)
    return perm, signs.to(device)


def record_rotary(tape: Tape, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, prefix: int, half: bool) -> torch.Tensor:
    """timm's apply_rot_embed(_cat) on the non-prefix tokens of x (B, H, N, d); see the module doc."""
    n_pre = prefix
    perm, signs = _rotation(x.shape[-1], half, x.device)
    one, zero = torch.ones_like(cos[:1]).expand(n_pre, -1), torch.zeros_like(sin[:1]).expand(n_pre, -1)
    cos_all = torch.cat([one, cos], 0)
    sin_all = torch.cat([zero, sin * signs.to(sin.dtype)], 0)
    a = tape.passthrough(lambda t: t * cos_all, x)
    b = tape.passthrough(lambda t: t * sin_all, tape.move(lambda t: t[..., perm], x))
    return tape.passthrough(lambda t: t.to(x.dtype), tape.add(a, b))


class EvaAdapter(ViTAdapter):
    family = "vit"

    def __init__(self, model: nn.Module):  # noqa: C901 - one check per unsupported variant
        self.model = model.eval()
        m = model
        if getattr(m, "attn_pool", None) is not None:
            _refuse("the Eva pools with attention (MAP head), which is not handled yet")
        if getattr(m, "dynamic_img_size", False):
            _refuse("Eva with dynamic image sizes is not handled yet")
        if getattr(m, "rope_mixed", False):
            _refuse("Eva with mixed (per-depth) rotary embeddings is not handled yet")
        if getattr(m, "patch_drop", None) is not None and m.patch_drop.prob > 0:
            pass  # patch dropout is off in eval mode
        self.prefix_params = [t for t in (getattr(m, "cls_token", None), getattr(m, "reg_token", None)) if t is not None]
        self.prefix = sum(t.shape[1] for t in self.prefix_params)
        if self.prefix != getattr(m, "num_prefix_tokens", self.prefix):
            _refuse(f"the Eva declares {m.num_prefix_tokens} prefix tokens but has {self.prefix}")
        pool = m.global_pool
        if pool == "token" and getattr(m, "cls_token", None) is not None:
            self.pool = "token"
        elif pool == "avg":
            self.pool = "avg"
        else:
            _refuse(f"the Eva pools with {pool!r}; class-token and average pooling are handled")
        self.pool_from = self.prefix
        # bt_t reads value vectors off a fused qkv without biases (the plain ViT's layout), which an
        # Eva does not have: the class-token methods are left out on every Eva
        self.offers = frozenset(CAPABILITIES) - {"class_token"}
        self.description = ("EVA models (rotary embeddings, SwiGLU; average-pooled)" if self.pool == "avg" else
                            "EVA models (rotary embeddings, SwiGLU; the Beyond-Intuition value path is not mapped for them)")
        for i, blk in enumerate(m.blocks):
            if type(blk).__name__ != "EvaBlock":
                _refuse(f"block {i} is a {type(blk).__name__}, not a pre-norm EvaBlock")
            if getattr(blk.attn, "gate", None) is not None:
                _refuse("gated attention is not handled yet")
            if getattr(blk.attn, "qkv_bias_separate", False):
                _refuse("an Eva with a separately added qkv bias is not handled yet")
            mlp = type(blk.mlp).__name__
            if mlp not in ("SwiGLU", "GluMlp", "Mlp") or (mlp == "GluMlp" and getattr(blk.mlp, "chunk_dim", -1) != -1):
                _refuse(f"block {i} has a {mlp} MLP; SwiGLU (packed or not) and the plain two-layer MLP are handled")
        read_geometry(self, m, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))

    def with_model(self, model):
        return type(self)(model)

    def _rope(self):
        rope = getattr(self.model, "rope", None)
        if rope is None:
            return None
        emb = rope.get_embed() if hasattr(rope, "feat_shape") else rope.get_embed(shape=self.grid)
        return emb.chunk(2, -1)  # sin, cos

    def run(self, x: torch.Tensor, record: bool = False, sublayers: bool = False):
        self._sincos = self._rope()
        if getattr(self.model, "pos_embed", None) is None:
            _refuse("an Eva without an absolute position embedding is not handled yet")
        return super().run(x, record=record, sublayers=sublayers)

    def _block(self, tape: Tape, blk, x, b: int, sink: list | None = None):
        attn = blk.attn
        n_batch, n_tok, _ = x.shape
        heads, head_dim = attn.num_heads, attn.head_dim
        h = tape.passthrough(blk.norm1, x)
        if attn.qkv is not None:
            qkv = tape.linear(h, attn.qkv if attn.q_bias is None else _QKVWithBias(attn))

            def part(i):
                return lambda t: t.reshape(n_batch, n_tok, 3, heads, head_dim).permute(2, 0, 3, 1, 4)[i]

            q, k, v = (tape.move(part(i), qkv) for i in range(3))
        else:
            def heads_first(t):
                return t.reshape(n_batch, n_tok, heads, head_dim).transpose(1, 2)

            q, k, v = (tape.move(heads_first, tape.linear(h, lin)) for lin in (attn.q_proj, attn.k_proj, attn.v_proj))
        q = tape.passthrough(attn.q_norm, q)
        k = tape.passthrough(attn.k_norm, k)
        if self._sincos is not None:
            sin, cos = self._sincos
            half = getattr(attn, "rotate_half", False)
            q = record_rotary(tape, q, sin, cos, attn.num_prefix_tokens, half)
            k = record_rotary(tape, k, sin, cos, attn.num_prefix_tokens, half)
        q = tape.passthrough(lambda t: t * attn.scale, q)
        scores = tape.matmul(q, tape.move(lambda t: t.transpose(-2, -1), k), tag=("attn_scores", b))
        att = tape.softmax(scores)
        att = tape.passthrough(attn.attn_drop, att)
        out = tape.matmul(att, v, tag=("attn_value", b))
        out = tape.move(lambda t: t.transpose(1, 2).reshape(n_batch, n_tok, heads * head_dim), out)
        out = tape.passthrough(attn.norm, out)
        out = tape.linear(out, attn.proj)
        out = tape.passthrough(attn.proj_drop, out)
        gamma_1, gamma_2 = blk.gamma_1, blk.gamma_2
        if gamma_1 is not None:
            out = tape.passthrough(lambda t: gamma_1 * t, out)
        if sink is not None:  # each token as the attention sublayer alone transforms it (value, projection), unmixed
            with torch.no_grad():
                alone = attn.proj(attn.norm(v.transpose(1, 2).reshape(n_batch, n_tok, heads * head_dim)))
                alone = alone * gamma_1 if gamma_1 is not None else alone
            sink.append({"attn_in": x.detach(), "attn_out": alone})
        out = tape.passthrough(blk.drop_path1, out)
        x = tape.add(x, out)
        h = tape.passthrough(blk.norm2, x)
        mlp = blk.mlp
        if hasattr(mlp, "fc1_g"):  # SwiGLU
            gate = tape.passthrough(mlp.act, tape.linear(h, mlp.fc1_g))
            h = elementwise_product(tape, gate, tape.linear(h, mlp.fc1_x))
        elif type(mlp).__name__ == "GluMlp":  # one fc1 whose two halves are the gate and the value
            h = tape.linear(h, mlp.fc1)
            width = h.shape[-1] // 2
            first = tape.move(lambda t: t[..., :width], h)
            second = tape.move(lambda t: t[..., width:], h)
            if mlp.gate_last:
                h = elementwise_product(tape, first, tape.passthrough(mlp.act, second))
            else:
                h = elementwise_product(tape, tape.passthrough(mlp.act, first), second)
        else:
            h = tape.passthrough(mlp.act, tape.linear(h, mlp.fc1))
        h = tape.passthrough(mlp.drop1, h)
        h = tape.passthrough(mlp.norm, h)
        h = tape.linear(h, mlp.fc2)
        h = tape.passthrough(mlp.drop2, h)
        if gamma_2 is not None:
            h = tape.passthrough(lambda t: gamma_2 * t, h)
        if sink is not None:
            sink[-1].update(mlp_in=x.detach(), mlp_out=h.detach())
        h = tape.passthrough(blk.drop_path2, h)
        x = tape.add(x, h)
        return x, att
