"""AttnLRP and CP-LRP: against an independent per-op computation, against lxt's own rules, their
conservation properties, and their behaviour on every adapter (float64, tiny random models)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import transexplain
from transexplain.errors import UserError
from transexplain.lrp import propagate
from transexplain.lrp.attnlrp import AttnLRPRules

from conftest import make_vit
from test_swin import make_swin
from test_text_adapter import padded_batch, tiny_bert


def _images(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)


def _params(model):
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


# -- 1a. AttnLRP by explicit contribution tensors, in NumPy ------------------------------------------
def _stab(z, eps):
    return z + eps * np.where(z >= 0, 1.0, -1.0)


def _lin_rel(x, w, b, r, eps):
    """ε-rule on y = x Wᵀ + b with every contribution z_ij = x_i w_ji written out: (N, in, out)."""
    contrib = x[:, :, None] * w.T[None, :, :]
    z = contrib.sum(1) + b
    return (contrib / _stab(z, eps)[:, None, :] * r[:, None, :]).sum(2)


def _ln_fwd(x, w, b, e):
    mu = x.mean(-1, keepdims=True)
    sd = np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + e)
    return (x - mu) / sd * w + b, sd


def _ln_rel(x, w, b, e, r, eps):
    """LayerNorm with σ constant: y_j = Σ_i x_i (δ_ij - 1/D) w_j / σ + b_j, ε-rule on those z_ij."""
    d = x.shape[-1]
    y, sd = _ln_fwd(x, w, b, e)
    center = np.eye(d) - 1.0 / d
    contrib = x[:, :, None] * center[None] * (w[None, None, :] / sd[:, :, None])
    z = contrib.sum(1) + b
    assert np.allclose(z, y)
    return (contrib / _stab(z, eps)[:, None, :] * r[:, None, :]).sum(2)


def _add_rel(a, b, r, eps):
    s = r / _stab(a + b, eps)
    return a * s, b * s


def _bilinear_rel(a, b, r, eps):
    """z_ik = Σ_j a_ij b_jk, contributions a_ij b_jk written out; ε-rule, then halved."""
    contrib = a[:, :, None] * b[None, :, :]  # (i, j, k)
    z = contrib.sum(1)
    share = contrib / _stab(z, eps)[:, None, :] * r[:, None, :]
    return share.sum(2) / 2, share.sum(0) / 2


def _gelu(x):
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def brute_attnlrp(model, img, target, eps):
    """One image (C, H, W) -> (H, W) AttnLRP pixel relevance, from the rules alone (no autograd)."""
    p = _params(model)
    heads = model.blocks[0].attn.num_heads
    ps = model.patch_embed.patch_size[0]
    x = img.numpy()
    c, hh, ww = x.shape
    gh, gw = hh // ps, ww // ps
    patches = x.reshape(c, gh, ps, gw, ps).transpose(1, 3, 0, 2, 4).reshape(gh * gw, c * ps * ps)
    wc = p["patch_embed.proj.weight"].reshape(-1, c * ps * ps)
    emb = patches @ wc.T + p["patch_embed.proj.bias"]
    h0 = np.concatenate([p["cls_token"][0], emb], 0)
    pos = p["pos_embed"][0]
    h = h0 + pos
    fwd = []
    for i, blk in enumerate(model.blocks):
        q = f"blocks.{i}."
        e1, e2 = blk.norm1.eps, blk.norm2.eps
        n1, _ = _ln_fwd(h, p[q + "norm1.weight"], p[q + "norm1.bias"], e1)
        qkv = n1 @ p[q + "attn.qkv.weight"].T + p[q + "attn.qkv.bias"]
        n, d = qkv.shape[0], qkv.shape[1] // 3
        hd = d // heads
        parts = qkv.reshape(n, 3, heads, hd).transpose(1, 2, 0, 3)  # (3, heads, n, hd)
        qs = parts[0] * blk.attn.scale
        logits_att = np.stack([qs[k] @ parts[1][k].T for k in range(heads)])
        att = np.exp(logits_att - logits_att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        ctx = np.stack([att[k] @ parts[2][k] for k in range(heads)])
        merged = ctx.transpose(1, 0, 2).reshape(n, d)
        proj = merged @ p[q + "attn.proj.weight"].T + p[q + "attn.proj.bias"]
        h1 = h + proj
        n2, _ = _ln_fwd(h1, p[q + "norm2.weight"], p[q + "norm2.bias"], e2)
        f1 = n2 @ p[q + "mlp.fc1.weight"].T + p[q + "mlp.fc1.bias"]
        f2 = _gelu(f1) @ p[q + "mlp.fc2.weight"].T + p[q + "mlp.fc2.bias"]
        fwd.append(dict(h=h, n1=n1, qkv=qkv, qs=qs, parts=parts, logits_att=logits_att, att=att, merged=merged,
                        h1=h1, n2=n2, f1=f1, f2=f2, e1=e1, e2=e2, hd=hd))
        h = h1 + f2
    hn, _ = _ln_fwd(h, p["norm.weight"], p["norm.bias"], model.norm.eps)
    logits = hn[0] @ p["head.weight"].T + p["head.bias"]
    # backwards
    r_logits = np.zeros_like(logits)
    r_logits[target] = logits[target]
    r_cls = _lin_rel(hn[:1], p["head.weight"], p["head.bias"], r_logits[None], eps)
    r_hn = np.zeros_like(hn)
    r_hn[0] = r_cls[0]
    r = _ln_rel(h, p["norm.weight"], p["norm.bias"], model.norm.eps, r_hn, eps)
    for i in range(len(model.blocks) - 1, -1, -1):
        q, f = f"blocks.{i}.", fwd[i]
        r_h1, r_f2 = _add_rel(f["h1"], f["f2"], r, eps)
        r_g = _lin_rel(_gelu(f["f1"]), p[q + "mlp.fc2.weight"], p[q + "mlp.fc2.bias"], r_f2, eps)
        r_n2 = _lin_rel(f["n2"], p[q + "mlp.fc1.weight"], p[q + "mlp.fc1.bias"], r_g, eps)  # GELU: identity
        r_h1 = r_h1 + _ln_rel(f["h1"], p[q + "norm2.weight"], p[q + "norm2.bias"], f["e2"], r_n2, eps)
        r_h, r_proj = _add_rel(f["h"], f["h1"] - f["h"], r_h1, eps)
        r_merged = _lin_rel(f["merged"], p[q + "attn.proj.weight"], p[q + "attn.proj.bias"], r_proj, eps)
        n = r_merged.shape[0]
        r_ctx = r_merged.reshape(n, heads, f["hd"]).transpose(1, 0, 2)
        r_parts = np.zeros_like(f["parts"])
        for k in range(heads):
            r_att, r_parts[2][k] = _bilinear_rel(f["att"][k], f["parts"][2][k], r_ctx[k], eps)
            x_in, s = f["logits_att"][k], f["att"][k]
            r_logit = x_in * (r_att - s * r_att.sum(-1, keepdims=True))  # the softmax rule
            r_q, r_kt = _bilinear_rel(f["qs"][k], f["parts"][1][k].T, r_logit, eps)
            r_parts[0][k], r_parts[1][k] = r_q, r_kt.T  # the scale by 1/sqrt(d): identity
        r_qkv = r_parts.transpose(2, 0, 1, 3).reshape(n, -1)
        r_n1 = _lin_rel(f["n1"], p[q + "attn.qkv.weight"], p[q + "attn.qkv.bias"], r_qkv, eps)
        r = r_h + _ln_rel(f["h"], p[q + "norm1.weight"], p[q + "norm1.bias"], f["e1"], r_n1, eps)
    r_h0, _ = _add_rel(h0, np.broadcast_to(pos, h0.shape), r, eps)
    r_patches = _lin_rel(patches, wc, p["patch_embed.proj.bias"], r_h0[1:], eps)
    r_img = r_patches.reshape(gh, gw, c, ps, ps).transpose(2, 0, 3, 1, 4).reshape(c, hh, ww)
    return r_img.sum(0), logits


@pytest.mark.parametrize("eps", [1e-6, 0.0])
def test_attnlrp_equals_explicit_contributions(eps):
    model = make_vit(depth=2, seed=3)
    x = _images(2, seed=1)
    target = torch.tensor([1, 4])
    e = transexplain.explain(model, x, "attnlrp", target=target, epsilon=eps)
    for i in range(2):
        ref, logits = brute_attnlrp(model, x[i], int(target[i]), eps)
        np.testing.assert_allclose(e.logits[i].numpy(), logits, rtol=1e-12, atol=1e-12)
        got = e.token_map[i].numpy()
        scale = np.abs(ref).max()
        assert np.abs(got - ref).max() <= 1e-6 * scale, np.abs(got - ref).max() / scale


# -- 1b. CP-LRP by autograd through a hand-written forward with the detaches -------------------------
def handwritten_cp_lrp(model, x, target, detach_mean=False):
    x = x.clone().requires_grad_(True)
    heads = model.blocks[0].attn.num_heads

    def ln(t, mod):
        mu = t.mean(-1, keepdim=True)
        sd = torch.sqrt(((t - mu) ** 2).mean(-1, keepdim=True) + mod.eps).detach()
        if detach_mean:
            mu = mu.detach()
        return (t - mu) / sd * mod.weight + mod.bias

    pe = model.patch_embed.proj
    h = F.conv2d(x, pe.weight, pe.bias, stride=pe.stride).flatten(2).transpose(1, 2)
    h = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), h], 1) + model.pos_embed
    for blk in model.blocks:
        b, n, d = h.shape
        qkv = F.linear(ln(h, blk.norm1), blk.attn.qkv.weight, blk.attn.qkv.bias)
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q * blk.attn.scale @ k.transpose(-2, -1), -1).detach()
        o = (att @ v).transpose(1, 2).reshape(b, n, d)
        h = h + F.linear(o, blk.attn.proj.weight, blk.attn.proj.bias)
        m = F.gelu(F.linear(ln(h, blk.norm2), blk.mlp.fc1.weight, blk.mlp.fc1.bias))
        h = h + F.linear(m, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    logits = F.linear(ln(h, model.norm)[:, 0], model.head.weight, model.head.bias)
    (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
    return (g * x).sum(1).detach(), logits.detach()


@pytest.mark.parametrize("detach_mean", [False, True])
def test_cp_lrp_equals_handwritten_detached_gradient_times_input(detach_mean):
    model = make_vit(depth=2, seed=3)
    x = _images(3, seed=2)
    target = torch.tensor([0, 2, 4])
    e = transexplain.explain(model, x, "cp_lrp", target=target, detach_mean=detach_mean)
    ref, logits = handwritten_cp_lrp(model, x, target, detach_mean)
    torch.testing.assert_close(e.logits, logits, rtol=1e-12, atol=1e-12)
    err = (e.token_map - ref).abs().max() / ref.abs().max()
    assert err <= 1e-10, err


# -- 2. against lxt's own explicit rule functions ---------------------------------------------------
def lxt_attnlrp(model, x, target, eps):
    """The tiny ViT's forward built from lxt's explicit LRP functions; relevance comes back as x.grad."""
    lf = pytest.importorskip("lxt.explicit.functional")
    from lxt.explicit.rules import epsilon_lrp, identity

    x = x.clone().requires_grad_(True)
    heads = model.blocks[0].attn.num_heads
    p = {k: v.detach() for k, v in model.state_dict().items()}

    def ln(t, name, mod):
        return lf.layer_norm_grad_fn.apply(t, p[name + ".weight"], p[name + ".bias"], mod.eps, eps)

    def lin(t, name):
        return lf.linear_epsilon(t, p[name + ".weight"], p[name + ".bias"], epsilon=eps)

    pe = model.patch_embed.proj
    h = epsilon_lrp(lambda t: F.conv2d(t, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=pe.stride), eps, x)
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([p["cls_token"].expand(x.shape[0], -1, -1), h], 1)
    h = lf.add2(h, p["pos_embed"].expand_as(h), epsilon=eps)
    for i, blk in enumerate(model.blocks):
        q_ = f"blocks.{i}."
        b, n, d = h.shape
        qkv = lin(ln(h, q_ + "norm1", blk.norm1), q_ + "attn.qkv")
        q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        q = identity(lambda t: t * blk.attn.scale, q)
        att = lf.softmax(lf.matmul(q, k.transpose(-2, -1), epsilon=eps), -1)
        o = lf.matmul(att, v, epsilon=eps).transpose(1, 2).reshape(b, n, d)
        h = lf.add2(h, lin(o, q_ + "attn.proj"), epsilon=eps)
        m = identity(F.gelu, lin(ln(h, q_ + "norm2", blk.norm2), q_ + "mlp.fc1"))
        h = lf.add2(h, lin(m, q_ + "mlp.fc2"), epsilon=eps)
    logits = lin(ln(h, "norm", model.norm)[:, 0], "head")
    seed = F.one_hot(target, logits.shape[-1]).to(logits.dtype) * logits.detach()
    logits.backward(seed)
    return x.grad.sum(1), logits.detach()


def test_attnlrp_matches_lxt_rules():
    model = make_vit(depth=2, seed=3)
    x = _images(2, seed=4)
    target = torch.tensor([3, 1])
    # lxt stabilises every denominator with +ε whatever its sign, we with ε·sign(z) (the ε-rule of
    # Bach et al.): with ε = 1e-12 the two conventions differ by ~1e-12/|z| relative per op
    e = transexplain.explain(model, x, "attnlrp", target=target, epsilon=1e-12)
    ref, logits = lxt_attnlrp(model, x, target, 1e-12)
    torch.testing.assert_close(e.logits, logits, rtol=1e-12, atol=1e-12)
    err = (e.token_map - ref).abs().max() / ref.abs().max()
    assert err <= 1e-8, err


# -- 3. conservation ----------------------------------------------------------------------------------
def _zero_biases(model, constants=True):
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if name.endswith("bias") or (constants and name in ("pos_embed", "cls_token")):
                prm.zero_()
    return model


def test_attnlrp_conserves_node_by_node_without_biases():
    """With biases (and the added position embedding) zeroed and ε = 0, every rule but the softmax
    rule (which is not conservative: Prop. 3.1 leaves a bias-like term) conserves relevance."""
    model = _zero_biases(make_vit(depth=2, seed=5), constants=False)
    with torch.no_grad():
        model.pos_embed.zero_()
    x = _images(2, seed=6)
    adapter = transexplain.as_adapter(model)
    trace = adapter.run(x, record=True)
    seed = F.one_hot(trace.logits.argmax(-1), 5).double() * trace.logits
    checked = {"linear": 0, "add": 0, "matmul": 0, "pass": 0, "conv_input": 0}

    def check(node, r_out, r_ins):
        if node.kind not in checked:
            return
        out = r_out.reshape(r_out.shape[0], -1).sum(1)
        tot = sum(ri.reshape(ri.shape[0], -1).sum(1) for ri in r_ins if ri is not None)
        torch.testing.assert_close(tot, out, rtol=1e-9, atol=1e-12)
        checked[node.kind] += 1

    propagate(trace.tape, trace.logits, seed, AttnLRPRules(0.0), on_node=check)
    assert all(v > 0 for v in checked.values()), checked


def test_cp_lrp_is_conservative_for_a_bias_free_relu_vit():
    """CP-LRP's detached forward is linear in the pixels once biases, the class token and the position
    embedding are zero and the activation is ReLU: its Gradient × Input then sums to the logit."""
    model = _zero_biases(make_vit(depth=2, seed=7, act_layer=torch.nn.ReLU))
    x = _images(3, seed=8)
    e = transexplain.explain(model, x, "cp_lrp")
    total = e.token_map.sum((1, 2))
    logit = e.logits.gather(1, e.target[:, None]).squeeze(1)
    torch.testing.assert_close(total, logit, rtol=1e-10, atol=1e-12)


# -- 4. behaviour -------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_batch_invariant_and_target(method):
    model = make_vit(depth=2, seed=1)
    x = _images(3, seed=9)
    whole = transexplain.explain(model, x, method, target=2)
    for i in range(3):
        one = transexplain.explain(model, x[i:i + 1], method, target=2)
        torch.testing.assert_close(one.token_map[0], whole.token_map[i], rtol=1e-12, atol=1e-14)
    assert (whole.target == 2).all()
    other = transexplain.explain(model, x, method, target=[0, 1, 3])
    assert other.target.tolist() == [0, 1, 3]
    assert not torch.allclose(other.token_map, whole.token_map)
    assert whole.token_map.shape == (3, 16, 16)


@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_finite_on_black_and_constant_images(method):
    model = make_vit(depth=2, seed=1)
    for x in (torch.zeros(2, 3, 16, 16, dtype=torch.float64), torch.full((2, 3, 16, 16), 0.7, dtype=torch.float64)):
        e = transexplain.explain(model, x, method)
        assert torch.isfinite(e.token_map).all() and torch.isfinite(e.heatmap).all()


@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_runs_on_swin(method):
    model = make_swin()
    x = torch.randn(2, 3, 56, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    e = transexplain.explain(model, x, method, target=1)
    assert e.token_map.shape == (2, 56, 56) and torch.isfinite(e.token_map).all()
    assert e.token_map.abs().sum() > 0
    one = transexplain.explain(model, x[1:], method, target=1)
    torch.testing.assert_close(one.token_map[0], e.token_map[1], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("method", ["attnlrp", "cp_lrp"])
def test_runs_on_bert_text(method):
    model = tiny_bert()
    ids, mask = padded_batch()
    e = transexplain.explain(model, {"input_ids": ids, "attention_mask": mask}, method, target=2)
    assert e.token_map.shape == (3, 9) and torch.isfinite(e.token_map).all()
    assert (e.token_map[mask == 0] == 0).all()
    assert (e.token_map[mask == 1] != 0).all()
    # the padded sample explained alone, unpadded, gives the same scores on its tokens
    one = transexplain.explain(model, {"input_ids": ids[2:, :4], "attention_mask": mask[2:, :4]}, method, target=2)
    torch.testing.assert_close(one.token_map[0], e.token_map[2, :4], rtol=1e-9, atol=1e-14)


def test_cp_lrp_on_bert_equals_detached_autograd():
    """On BERT: the tape walk equals autograd through HF's own modules with the softmax output and the
    LayerNorm std detached (patched in for this test only)."""
    model = tiny_bert()
    ids, mask = padded_batch()
    adapter = transexplain.as_adapter(model)
    batch = adapter.prepare({"input_ids": ids, "attention_mask": mask})
    e = transexplain.explain(model, {"input_ids": ids, "attention_mask": mask}, "cp_lrp", target=1)

    def ln_detached(mod, t):
        mu = t.mean(-1, keepdim=True)
        sd = torch.sqrt(((t - mu) ** 2).mean(-1, keepdim=True) + mod.eps).detach()
        return (t - mu) / sd * mod.weight + mod.bias

    emb = adapter.embed(batch).detach().requires_grad_(True)
    bias = (1.0 - mask[:, None, None, :].double()) * torch.finfo(torch.float64).min
    h = emb
    for layer in model.bert.encoder.layer:
        sa = layer.attention.self
        b, n, d = h.shape
        heads = sa.num_attention_heads if hasattr(sa, "num_attention_heads") else model.config.num_attention_heads
        split = lambda t: t.reshape(b, n, heads, d // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(sa.query(h)), split(sa.key(h)), split(sa.value(h))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // heads) + bias, -1).detach()
        ctx = (att @ v).transpose(1, 2).reshape(b, n, d)
        h = ln_detached(layer.attention.output.LayerNorm, layer.attention.output.dense(ctx) + h)
        i = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(h))
        h = ln_detached(layer.output.LayerNorm, layer.output.dense(i) + h)
    logits = model.classifier(model.bert.pooler.activation(model.bert.pooler.dense(h[:, 0])))
    (g,) = torch.autograd.grad(logits[:, 1].sum(), emb)
    ref = (g * emb).sum(-1).detach() * mask
    torch.testing.assert_close(e.logits, logits.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(e.token_map, ref, rtol=1e-9, atol=1e-12)


def test_options_are_checked():
    model = make_vit(depth=1)
    x = _images(1)
    with pytest.raises(UserError):
        transexplain.explain(model, x, "attnlrp", epsilon=-1.0)
    with pytest.raises(UserError):
        transexplain.explain(model, x, "cp_lrp", detach_mean="yes")
    with pytest.raises(UserError):
        transexplain.explain(model, x, "attnlrp", gamma=0.5)


# -- 5. the modified-gradient form against the tape walk -----------------------------------------------
def _walk_and_gradient(model, x, rules_walk, rules_grad, seed_is_logit, target):
    from transexplain.explainers.attnlrp import gradient_relevance, walk_relevance

    adapter = transexplain.as_adapter(model)
    if not torch.is_tensor(x):
        x = adapter.prepare(x)
    walked, logits, _ = walk_relevance(adapter, x, target, rules_walk, seed_is_logit)
    rel, logits2, _ = gradient_relevance(adapter, x, target, rules_grad)
    pixels = bool(getattr(adapter, "pixel_input", True))
    torch.testing.assert_close(logits2, logits, rtol=0, atol=0)  # the forward's values are untouched
    return walked, rel.sum(1) if pixels else rel.sum(-1)


@pytest.mark.parametrize("family", ["vit", "swin", "bert"])
@pytest.mark.parametrize("rules", ["attnlrp-1e-6", "attnlrp-0", "cp_lrp", "cp_lrp-mean"])
def test_gradient_form_equals_the_tape_walk(family, rules):
    """What the explainers run (one autograd backward through the forward with modified local
    gradients) equals the walk over the recorded tape with the rules node by node, to rounding."""
    from transexplain.lrp.attnlrp import AttnLRPGradient, DetachedGradient, DetachedGradientRules

    if family == "vit":
        model, x = make_vit(depth=2, seed=3), _images(3, seed=4)
    elif family == "swin":
        model = make_swin()
        x = torch.randn(2, 3, 56, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    else:
        model = tiny_bert()
        ids, mask = padded_batch()
        x = {"input_ids": ids, "attention_mask": mask}
    if rules.startswith("attnlrp"):
        eps = 1e-6 if rules.endswith("1e-6") else 0.0
        walked, grad = _walk_and_gradient(model, x, AttnLRPRules(eps), AttnLRPGradient(eps), True, 1)
    else:
        mean = rules.endswith("mean")
        walked, grad = _walk_and_gradient(model, x, DetachedGradientRules(mean), DetachedGradient(mean), False, 1)
    scale = walked.abs().amax()
    assert scale > 0
    assert ((grad - walked).abs().amax() / scale).item() < 1e-12
