"""LibraGrad (Mehri et al. CVPR 2025) as the `libragrad=true` option of the gradient methods: its
gradient against an independent hand-written forward with the same detachments (float64, plain
autograd; ViT, BERT, and the ½ rule on the gated-MLP products of EVA-02 and Llama), its FullGrad
completeness, batch invariance, the option's listing and the CLI."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import transexplain
from transexplain.errors import UserError
from transexplain.explainers import get_method
from transexplain.lrp.attnlrp import LibraGrad
from transexplain.lrp.core import gradient_rules

from conftest import make_vit
from test_swin import make_swin
from test_text_adapter import padded_batch, tiny_bert

GRADIENT_METHODS = ["saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "gradcam",
                    "generic_attention", "legrad"]


def _images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)


def _ln_libra(mod, t):
    """LayerNorm with σ = sqrt(Var + eps) a constant, the centring kept."""
    mu = t.mean(-1, keepdim=True)
    sd = torch.sqrt(((t - mu) ** 2).mean(-1, keepdim=True) + mod.eps).detach()
    return (t - mu) / sd * mod.weight + mod.bias


def _gelu_libra(t):
    """GELU = t · Φ(t) with the gate Φ a constant."""
    return t * (0.5 * (1 + torch.erf(t / math.sqrt(2)))).detach()


def libra_vit_forward(model, x, keep=None):
    """A tiny timm ViT written out op by op with LibraGrad's three detachments; `keep` collects each
    block's attention probabilities as leaves (their gradient is what GradCAM & co. read)."""
    b = x.shape[0]
    h = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=model.patch_embed.patch_size)
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([model.cls_token.expand(b, -1, -1), h], 1) + model.pos_embed
    for blk in model.blocks:
        a = blk.attn
        n, d = h.shape[1], h.shape[2]
        heads, hd = a.num_heads, d // a.num_heads
        qkv = F.linear(_ln_libra(blk.norm1, h), a.qkv.weight, a.qkv.bias).reshape(b, n, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), -1).detach().requires_grad_(True)
        if keep is not None:
            keep.append(att)
        o = (att @ v).transpose(1, 2).reshape(b, n, d)
        h = h + F.linear(o, a.proj.weight, a.proj.bias)
        m = F.linear(_gelu_libra(F.linear(_ln_libra(blk.norm2, h), blk.mlp.fc1.weight, blk.mlp.fc1.bias)),
                     blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        h = h + m
    return F.linear(_ln_libra(model.norm, h)[:, 0], model.head.weight, model.head.bias)


def _reference_gradient(model, x, target):
    xr = x.clone().requires_grad_(True)
    logits = libra_vit_forward(model, xr)
    (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), xr)
    return logits.detach(), g


def _rel(a, b):
    return ((a - b).abs().amax() / b.abs().amax()).item()


def test_gradient_equals_the_handwritten_detached_forward():
    """saliency and input × gradient with libragrad=true are the hand-written forward's gradient,
    read as each method reads it; without the option they differ from it."""
    model, x = make_vit(depth=2, seed=3), _images(3, seed=4)
    target = torch.tensor([0, 3, 1])
    logits, g = _reference_gradient(model, x, target)
    sal = transexplain.explain(model, x, "saliency", target=target, libragrad=True)
    ixg = transexplain.explain(model, x, "input_x_gradient", target=target, libragrad=True)
    torch.testing.assert_close(sal.logits, logits, rtol=1e-13, atol=1e-13)
    assert _rel(sal.token_map, g.abs().amax(1)) < 1e-12
    assert _rel(ixg.token_map, (g * x).sum(1)) < 1e-12
    plain = transexplain.explain(model, x, "input_x_gradient", target=target)
    assert _rel(plain.token_map, (g * x).sum(1)) > 1e-2


def test_integrated_gradients_and_smoothgrad_use_the_rewired_gradient():
    """IG and SmoothGrad average the same rewired gradient over their inputs (a Gauss-Legendre path,
    seeded noisy copies): checked against the hand-written forward at the same points."""
    import numpy as np

    model, x = make_vit(depth=1, seed=5), _images(2, seed=6)
    target = torch.tensor([2, 4])
    steps = 4
    ig = transexplain.explain(model, x, "integrated_gradients", target=target, libragrad=True, steps=steps)
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    ref = torch.zeros_like(x)
    for node, weight in zip(nodes, weights):
        alpha = float((node + 1) / 2)
        _, g = _reference_gradient(model, alpha * x, target)
        ref += float(weight / 2) * g
    # Captum rounds the quadrature weights to float32 (docs/methods.md): 6e-8 relative at most
    assert _rel(ig.token_map, (ref * x).sum(1)) < 1e-6

    sg = transexplain.explain(model, x, "smoothgrad", target=target, libragrad=True, samples=3)
    explainer = get_method("smoothgrad")(samples=3)

    class Wrapped:  # what SmoothGrad.noise reads
        pixels, inputs, valid = True, x, None

    noise = explainer.noise(x, Wrapped)
    ref = torch.zeros_like(x)
    for k in range(3):
        _, g = _reference_gradient(model, x + noise[:, k], target)
        ref += g.abs() / 3
    assert _rel(sg.token_map, ref.amax(1)) < 1e-12


def test_attention_gradients_equal_the_handwritten_forward():
    """The gradient of the logit with respect to each block's attention probabilities (what GradCAM,
    generic attention and LeGrad read) under LibraGrad: later softmaxes, norms and GELUs rewired."""
    from transexplain.explainers.base import target_gradients

    model, x = make_vit(depth=3, seed=7), _images(2, seed=8)
    target = torch.tensor([1, 4])
    adapter = transexplain.as_adapter(model)
    with gradient_rules(LibraGrad()):
        trace = adapter.run(x.clone().requires_grad_(True))
    ours = target_gradients(trace.logits, target, trace.attentions)
    keep = []
    logits = libra_vit_forward(model, x, keep)
    ref = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), keep)
    for a, b in zip(ours, ref):
        assert _rel(a, b) < 1e-12
    plain = adapter.run(x.clone().requires_grad_(True))
    assert _rel(target_gradients(plain.logits, target, plain.attentions)[0], ref[0]) > 1e-3
    # the methods themselves run and differ from their plain version
    for method in ("gradcam", "generic_attention", "legrad"):
        on = transexplain.explain(model, x, method, target=target, libragrad=True)
        off = transexplain.explain(model, x, method, target=target)
        assert torch.isfinite(on.token_map).all() and not torch.allclose(on.token_map, off.token_map)


def _bias_like(model):
    return [p for name, p in model.named_parameters()
            if name.endswith("bias") or name in ("cls_token", "pos_embed")]


def test_fullgrad_completeness():
    """The paper's claim: with the three detachments the forward is linear in the input and the
    bias-like terms, so x·∇x + Σ b·∇b equals the logit (FullGrad completeness). The plain gradient
    misses it by far; with zero biases, class token and position embedding input × gradient alone
    sums to the logit."""
    model, x = make_vit(depth=2, seed=9), _images(3, seed=10)
    adapter = transexplain.as_adapter(model)
    for p in model.parameters():
        p.requires_grad_(True)
    biases = _bias_like(model)
    gaps = {}
    for libra in (True, False):
        xr = x.clone().requires_grad_(True)
        with gradient_rules(LibraGrad() if libra else None):
            logits = adapter.run(xr).logits
        target = logits.argmax(-1)
        totals = []
        for i in range(len(x)):  # per sample: the bias gradients are summed over the batch
            grads = torch.autograd.grad(logits[i, target[i]], [xr] + biases, retain_graph=True, allow_unused=True)
            total = (grads[0][i] * x[i]).sum()
            total = total + sum((g * p).sum() for g, p in zip(grads[1:], biases) if g is not None)
            totals.append(total)
        want = logits.detach().gather(1, target[:, None]).squeeze(1)
        gaps[libra] = ((torch.stack(totals).detach() - want).abs() / want.abs()).max().item()
    assert gaps[True] < 1e-10, gaps
    assert gaps[False] > 1e-2, gaps

    with torch.no_grad():
        for p in biases:
            p.zero_()
    e = transexplain.explain(model, x, "input_x_gradient", libragrad=True)
    logit = e.logits.gather(1, e.target[:, None]).squeeze(1)
    torch.testing.assert_close(e.token_map.sum((1, 2)), logit, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_batch_invariant(method):
    model, x = make_vit(depth=2, seed=1), _images(3, seed=2)
    opts = {"libragrad": True}
    if method in ("integrated_gradients", "smoothgrad"):
        opts.update(steps=3) if method == "integrated_gradients" else opts.update(samples=2)
    whole = transexplain.explain(model, x, method, target=2, **opts)
    for i in range(3):
        one = transexplain.explain(model, x[i:i + 1], method, target=2, **opts)
        torch.testing.assert_close(one.token_map[0], whole.token_map[i], rtol=1e-10, atol=1e-13)


def test_bert_equals_detached_autograd():
    """On Hugging Face BERT: input × gradient with libragrad=true equals autograd through HF's own
    modules with the softmax output, LayerNorm's σ and GELU's gate detached (the pooler's tanh keeps
    its derivative: not a gated activation)."""
    model = tiny_bert()
    ids, mask = padded_batch()
    adapter = transexplain.as_adapter(model)
    batch = adapter.prepare({"input_ids": ids, "attention_mask": mask})
    e = transexplain.explain(model, {"input_ids": ids, "attention_mask": mask}, "input_x_gradient", target=1,
                             libragrad=True)
    emb = adapter.embed(batch).detach().requires_grad_(True)
    bias = (1.0 - mask[:, None, None, :].double()) * torch.finfo(torch.float64).min
    h = emb
    heads = model.config.num_attention_heads
    for layer in model.bert.encoder.layer:
        sa = layer.attention.self
        b, n, d = h.shape
        split = lambda t: t.reshape(b, n, heads, d // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(sa.query(h)), split(sa.key(h)), split(sa.value(h))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads) + bias, -1).detach()
        ctx = (att @ v).transpose(1, 2).reshape(b, n, d)
        h = _ln_libra(layer.attention.output.LayerNorm, layer.attention.output.dense(ctx) + h)
        i = _gelu_libra(layer.intermediate.dense(h))
        h = _ln_libra(layer.output.LayerNorm, layer.output.dense(i) + h)
    logits = model.classifier(model.bert.pooler.activation(model.bert.pooler.dense(h[:, 0])))
    (g,) = torch.autograd.grad(logits[:, 1].sum(), emb)
    ref = (g * emb).sum(-1).detach() * mask
    torch.testing.assert_close(e.logits, logits.detach(), rtol=1e-12, atol=1e-12)
    assert _rel(e.token_map, ref) < 1e-12


# -- gated-MLP products (EVA-02's SwiGLU, Llama's MLP): LibraGrad's "DU" rule ----------------------
# y = act(g) ⊙ u with both factors computed from the input: each factor gets half its usual gradient
# (the authors' fork halves the product's output gradient, `fair_gated_mlp` with mode "DU", which the
# "LibraGrad" preset switches on), and the gate of act (SiLU: σ(g)) is a constant.
EVA_VARIANTS = {
    "eva02-packed-swiglu": dict(),  # GluMlp: one fc1, its first half through SiLU times its second
    "swiglu-subln-fused": dict(qkv_fused=True, scale_mlp=True, init_values=0.5),  # SwiGLU + sub-LNs, layer scale
    "class-token-half-rope": dict(global_pool="token", rope_rotate_half=True),
}


def tiny_eva(variant, seed=0):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=16, patch_size=4, embed_dim=16,
                              depth=2, num_heads=2, num_classes=5, ref_feat_shape=(4, 4), **EVA_VARIANTS[variant])
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # spread: peaked attention, SiLU far from linear; norm weights near 1
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.5 * noise)
    return model.double().eval()


def _silu_libra(t):
    """SiLU = t · σ(t) with the gate σ a constant."""
    return t * torch.sigmoid(t).detach()


def _half_mul(a, b):
    """a ⊙ b with half the gradient to each factor."""
    return 0.5 * (a * b.detach() + a.detach() * b)


def _ln_or_identity(mod, t):
    return t if isinstance(mod, torch.nn.Identity) else _ln_libra(mod, t)


def libra_eva_forward(model, x, half=True):
    """timm's Eva written out op by op from its parameters with LibraGrad's detachments and the ½
    rule on the SwiGLU product (half=False: the plain product, to show that the rule matters)."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    mul = _half_mul if half else torch.mul
    b = x.shape[0]
    h = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=model.patch_embed.patch_size)
    h = torch.cat([model.cls_token.expand(b, -1, -1), h.flatten(2).transpose(1, 2)], 1) + model.pos_embed
    rope = model.rope.get_embed()
    for blk in model.blocks:
        a = blk.attn
        z = _ln_libra(blk.norm1, h)
        n = z.shape[1]
        if a.qkv is not None:
            qkv = F.linear(z, a.qkv.weight, torch.cat((a.q_bias, torch.zeros_like(a.q_bias), a.v_bias)))
            q, k, v = qkv.reshape(b, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (F.linear(z, lin.weight, lin.bias).reshape(b, n, a.num_heads, -1).transpose(1, 2)
                       for lin in (a.q_proj, a.k_proj, a.v_proj))
        q = torch.cat([q[:, :, :1], apply_rot_embed_cat(q[:, :, 1:], rope, half=a.rotate_half)], 2)
        k = torch.cat([k[:, :, :1], apply_rot_embed_cat(k[:, :, 1:], rope, half=a.rotate_half)], 2)
        att = torch.softmax((q * a.scale) @ k.transpose(-2, -1), -1).detach()
        o = _ln_or_identity(a.norm, (att @ v).transpose(1, 2).reshape(b, n, -1))
        o = F.linear(o, a.proj.weight, a.proj.bias)
        h = h + (blk.gamma_1 * o if blk.gamma_1 is not None else o)
        z = _ln_libra(blk.norm2, h)
        mlp = blk.mlp
        if hasattr(mlp, "fc1_g"):
            f = mul(_silu_libra(F.linear(z, mlp.fc1_g.weight, mlp.fc1_g.bias)),
                    F.linear(z, mlp.fc1_x.weight, mlp.fc1_x.bias))
        else:
            gate, u = F.linear(z, mlp.fc1.weight, mlp.fc1.bias).chunk(2, -1)
            f = mul(_silu_libra(gate), u)
        f = F.linear(_ln_or_identity(mlp.norm, f), mlp.fc2.weight, mlp.fc2.bias)
        h = h + (blk.gamma_2 * f if blk.gamma_2 is not None else f)
    if model.global_pool == "avg":
        h = _ln_or_identity(model.fc_norm, _ln_or_identity(model.norm, h)[:, 1:].mean(1))
    else:
        h = _ln_or_identity(model.norm, h)[:, 0]
    return F.linear(h, model.head.weight, model.head.bias)


@pytest.mark.parametrize("variant", list(EVA_VARIANTS))
def test_eva_swiglu_gets_half_the_gradient_on_each_factor(variant):
    """EVA-02 (SwiGLU, packed or not, sub-LNs, rotary embeddings): saliency and input × gradient with
    libragrad=true equal the gradient of the hand-written forward above; the plain-product version
    of it differs (the ½ rule is applied, not skipped)."""
    model, x = tiny_eva(variant), _images(2, seed=11)
    target = torch.tensor([1, 3])
    xr = x.clone().requires_grad_(True)
    logits = libra_eva_forward(model, xr)
    (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), xr)
    with torch.no_grad():
        assert (logits - model(x)).abs().max().item() < 1e-12  # the hand-written forward is timm's
    sal = transexplain.explain(model, x, "saliency", target=target, libragrad=True)
    ixg = transexplain.explain(model, x, "input_x_gradient", target=target, libragrad=True)
    assert _rel(sal.token_map, g.abs().amax(1)) < 1e-12
    assert _rel(ixg.token_map, (g * x).sum(1)) < 1e-12
    xr = x.clone().requires_grad_(True)
    (full,) = torch.autograd.grad(libra_eva_forward(model, xr, half=False).gather(1, target[:, None]).sum(), xr)
    assert _rel(ixg.token_map, (full * x).sum(1)) > 1e-2


def test_eva_fullgrad_completeness():
    """The ½ rule is what keeps LibraGrad FullGrad-complete through a gated product: act(g)·u with
    the gate constant is linear in g and in u, so ½ of each factor's gradient × the factor sums to
    the product. With it x·∇x + Σ b·∇b equals the logit on EVA-02; the rewiring without it (the
    plain product gradient) misses it."""
    model, x = tiny_eva("swiglu-subln-fused", seed=2), _images(2, seed=12)
    adapter = transexplain.as_adapter(model)
    for p in model.parameters():
        p.requires_grad_(True)
    biases = _bias_like(model)
    assert any(name.endswith("q_bias") for name, _ in model.named_parameters())
    gaps = {}
    no_half = LibraGrad()
    no_half.half_products = False
    for name, rules in (("libragrad", LibraGrad()), ("without the rule", no_half)):
        xr = x.clone().requires_grad_(True)
        with gradient_rules(rules):
            logits = adapter.run(xr).logits
        target = logits.argmax(-1)
        gap = 0.0
        for i in range(len(x)):
            grads = torch.autograd.grad(logits[i, target[i]], [xr] + biases, retain_graph=True, allow_unused=True)
            total = (grads[0][i] * x[i]).sum() + sum((g * p).sum() for g, p in zip(grads[1:], biases) if g is not None)
            gap = max(gap, ((total - logits[i, target[i]]).abs() / logits[i, target[i]].abs()).item())
        gaps[name] = gap
    assert gaps["libragrad"] < 1e-10, gaps
    assert gaps["without the rule"] > 1e-2, gaps


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.5 * torch.randn_like(p))
    return model.double().eval()


def test_llama_gated_mlp_equals_the_handwritten_forward():
    """Llama (decoders take the gradient methods too): input × gradient with libragrad=true equals
    autograd through the model's own modules with the softmax output detached, SiLU's gate constant
    and the ½ rule on act(x W_g) ⊙ (x W_u); RMSNorm keeps its gradient (only LayerNorm is rewired)."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 40, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 1
    last = torch.tensor([6, 4])
    e = transexplain.explain(model, {"input_ids": ids, "attention_mask": mask}, "input_x_gradient", libragrad=True)
    cfg = model.config
    emb = model.model.embed_tokens(ids).detach().requires_grad_(True)
    n = ids.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]
    bias = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    bias = bias[:, None]
    cos, sin = model.model.rotary_emb(emb, torch.arange(n)[None])
    cos, sin = cos[:, None], sin[:, None]
    groups = cfg.num_attention_heads // cfg.num_key_value_heads

    def heads(t, k):
        return t.reshape(t.shape[0], n, k, -1).transpose(1, 2)

    def rot(t):
        half = t.shape[-1] // 2
        return t * cos + torch.cat((-t[..., half:], t[..., :half]), -1) * sin

    def forward(mul):
        h = emb
        for layer in model.model.layers:
            sa, mlp = layer.self_attn, layer.mlp
            a = layer.input_layernorm(h)
            q = rot(heads(sa.q_proj(a), cfg.num_attention_heads))
            k = rot(heads(sa.k_proj(a), cfg.num_key_value_heads)).repeat_interleave(groups, 1)
            v = heads(sa.v_proj(a), cfg.num_key_value_heads).repeat_interleave(groups, 1)
            att = torch.softmax(q @ k.transpose(-1, -2) * sa.head_dim ** -0.5 + bias, -1).detach()
            h = h + sa.o_proj((att @ v).transpose(1, 2).reshape(2, n, -1))
            a = layer.post_attention_layernorm(h)
            h = h + mlp.down_proj(mul(_silu_libra(mlp.gate_proj(a)), mlp.up_proj(a)))
        return model.lm_head(model.model.norm(h)[torch.arange(2), last])

    refs = {}
    for name, mul in (("half", _half_mul), ("plain product", torch.mul)):
        logits = forward(mul)
        with torch.no_grad():
            own = model(input_ids=ids, attention_mask=mask).logits[torch.arange(2), last]
            assert (logits - own).abs().max() < 1e-12  # the hand-written forward is the model's
        (grad,) = torch.autograd.grad(logits.gather(1, e.target[:, None]).sum(), emb)
        refs[name] = (grad * emb).sum(-1).detach() * mask
    assert _rel(e.token_map, refs["half"]) < 1e-12
    assert _rel(e.token_map, refs["plain product"]) > 1e-2


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "gradcam", "generic_attention", "legrad"])
def test_runs_on_swin(method):
    model = make_swin()
    x = torch.randn(2, 3, 56, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    on = transexplain.explain(model, x, method, target=1, libragrad=True)
    off = transexplain.explain(model, x, method, target=1)
    assert torch.isfinite(on.token_map).all() and not torch.allclose(on.token_map, off.token_map)
    one = transexplain.explain(model, x[1:], method, target=1, libragrad=True)
    torch.testing.assert_close(one.token_map[0], on.token_map[1], rtol=1e-10, atol=1e-13)


def test_option_is_listed_and_checked():
    for method in GRADIENT_METHODS:
        assert get_method(method).defaults()["libragrad"] is False
    with pytest.raises(UserError):
        transexplain.explain(make_vit(depth=1), _images(1), "saliency", libragrad="yes")


def _cli(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "transexplain", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_cli_lists_and_takes_the_option(tmp_path):
    listing = _cli("methods", cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    for method in GRADIENT_METHODS:
        line = next(ln for ln in listing.stdout.splitlines() if ln.startswith(method + " "))
        assert "libragrad" in line, line
    import numpy as np
    from PIL import Image

    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8")).save(img)
    outs = {}
    for opt in ([], ["--option", "libragrad=true"]):
        out = tmp_path / ("on" if opt else "off")
        run = _cli("explain", str(img), "--model", "embedded", "--method", "saliency", *opt, "--out", str(out), cwd=tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr
        outs[bool(opt)] = np.load(next(out.glob("*.saliency.npy")))
    assert np.isfinite(outs[True]).all() and not np.allclose(outs[True], outs[False])
    bad = _cli("explain", str(img), "--model", "embedded", "--method", "saliency", "--option", "libragrad",
               "--out", str(tmp_path / "bad"), cwd=tmp_path)
    assert bad.returncode == 2
