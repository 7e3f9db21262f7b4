"""Hugging Face Swin and BEiT (canonized onto timm's layouts), timm Swin V2 and timm EVA-02: each
against its own forward and independent computations, on tiny random models in float64."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import transexplain
from transexplain import explain
from transexplain.models import as_adapter

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
EXACT = ("transformer_attribution", "attnlrp", "saliency", "input_x_gradient")


def _spread(model, seed=0, scale=0.5):
    """Weights spread enough to make attention peaked; norm weights near 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            is_norm = ("norm" in name or "ln_" in name) and name.endswith("weight")
            p.copy_(1 + 0.1 * noise if is_norm else scale * noise)
    return model.double().eval()


def _images(n=2, size=16, seed=3):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _logits(model, x):
    out = model(x)
    return getattr(out, "logits", out)


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _autograd_saliency(model, x):
    x = x.clone().requires_grad_(True)
    logits = _logits(model, x)
    t = logits.argmax(-1)
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), x)
    return g


# -- Hugging Face Swin and BEiT --------------------------------------------------------------------
def hf_swin(depths=(2, 2), **kw):
    from transformers import SwinConfig, SwinForImageClassification

    cfg = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=list(depths), num_heads=[1, 2][:len(depths)],
                     window_size=2, num_labels=3, **kw)
    return _spread(SwinForImageClassification(cfg))


def timm_swin_from_hf(hf):
    """timm's own SwinTransformer with the Hugging Face model's weights copied by name (strict)."""
    import timm

    c = hf.config
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=c.image_size, patch_size=c.patch_size,
                              window_size=c.window_size, embed_dim=c.embed_dim, depths=tuple(c.depths),
                              num_heads=tuple(c.num_heads), mlp_ratio=c.mlp_ratio, num_classes=c.num_labels,
                              drop_path_rate=0.0)
    s = hf.swin
    sd = {"patch_embed.proj.weight": s.embeddings.patch_embeddings.projection.weight,
          "patch_embed.proj.bias": s.embeddings.patch_embeddings.projection.bias,
          "patch_embed.norm.weight": s.embeddings.norm.weight, "patch_embed.norm.bias": s.embeddings.norm.bias,
          "norm.weight": s.layernorm.weight, "norm.bias": s.layernorm.bias,
          "head.fc.weight": hf.classifier.weight, "head.fc.bias": hf.classifier.bias}
    for i, stage in enumerate(s.encoder.layers):
        if i > 0:
            ds = s.encoder.layers[i - 1].downsample
            sd.update({f"layers.{i}.downsample.norm.weight": ds.norm.weight, f"layers.{i}.downsample.norm.bias": ds.norm.bias,
                       f"layers.{i}.downsample.reduction.weight": ds.reduction.weight})
        for j, layer in enumerate(stage.blocks):
            p, a = f"layers.{i}.blocks.{j}.", layer.attention
            sd.update({p + "norm1.weight": layer.layernorm_before.weight, p + "norm1.bias": layer.layernorm_before.bias,
                       p + "norm2.weight": layer.layernorm_after.weight, p + "norm2.bias": layer.layernorm_after.bias,
                       p + "attn.qkv.weight": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                       p + "attn.qkv.bias": torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
                       p + "attn.proj.weight": a.o_proj.weight, p + "attn.proj.bias": a.o_proj.bias,
                       p + "attn.relative_position_bias_table": a.relative_position_bias.relative_position_bias_table,
                       p + "mlp.fc1.weight": layer.mlp.fc1.weight, p + "mlp.fc1.bias": layer.mlp.fc1.bias,
                       p + "mlp.fc2.weight": layer.mlp.fc2.weight, p + "mlp.fc2.bias": layer.mlp.fc2.bias})
    model = model.double()
    model.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    return model.eval()


BEIT_VARIANTS = {
    "mean-pool": dict(),
    "class-token": dict(use_mean_pooling=False, layer_scale_init_value=0.0),
    "shared-bias": dict(use_relative_position_bias=False, use_shared_relative_position_bias=True,
                        use_absolute_position_embeddings=True),
}


def hf_beit(variant="mean-pool"):
    from transformers import BeitConfig, BeitForImageClassification

    kw = {"use_relative_position_bias": True, **BEIT_VARIANTS[variant]}
    cfg = BeitConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, num_labels=3, **kw)
    return _spread(BeitForImageClassification(cfg))


def timm_beit_from_hf(hf):
    """timm's own Beit with the Hugging Face model's weights copied by name (strict)."""
    import timm

    c = hf.config
    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=c.image_size, patch_size=c.patch_size,
                              embed_dim=c.hidden_size, depth=c.num_hidden_layers, num_heads=c.num_attention_heads,
                              mlp_ratio=c.intermediate_size / c.hidden_size, num_classes=c.num_labels,
                              use_abs_pos_emb=c.use_absolute_position_embeddings, use_rel_pos_bias=c.use_relative_position_bias,
                              use_shared_rel_pos_bias=c.use_shared_relative_position_bias,
                              init_values=c.layer_scale_init_value or 0.0,  # (create_model drops None)
                              global_pool="avg" if c.use_mean_pooling else "token")
    for mod in model.modules():  # transformers' BEiT LayerNorms use its layer_norm_eps (1e-12 by default)
        if isinstance(mod, torch.nn.LayerNorm):
            mod.eps = c.layer_norm_eps
    b = hf.beit
    e = b.embeddings
    sd = {"cls_token": e.cls_token, "patch_embed.proj.weight": e.patch_embeddings.projection.weight,
          "patch_embed.proj.bias": e.patch_embeddings.projection.bias,
          "head.weight": hf.classifier.weight, "head.bias": hf.classifier.bias}
    if e.position_embeddings is not None:
        sd["pos_embed"] = e.position_embeddings
    if b.shared_position_bias is not None:
        sd["rel_pos_bias.relative_position_bias_table"] = b.shared_position_bias.relative_position_bias_table
    final = b.pooler.layernorm if c.use_mean_pooling else b.layernorm
    name = "fc_norm" if c.use_mean_pooling else "norm"
    sd.update({f"{name}.weight": final.weight, f"{name}.bias": final.bias})
    for i, layer in enumerate(b.layers):
        p, a = f"blocks.{i}.", layer.attention
        sd.update({p + "norm1.weight": layer.layernorm_before.weight, p + "norm1.bias": layer.layernorm_before.bias,
                   p + "norm2.weight": layer.layernorm_after.weight, p + "norm2.bias": layer.layernorm_after.bias,
                   p + "attn.qkv.weight": torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                   p + "attn.q_bias": a.q_proj.bias, p + "attn.v_bias": a.v_proj.bias,
                   p + "attn.proj.weight": a.o_proj.weight, p + "attn.proj.bias": a.o_proj.bias,
                   p + "mlp.fc1.weight": layer.mlp.fc1.weight, p + "mlp.fc1.bias": layer.mlp.fc1.bias,
                   p + "mlp.fc2.weight": layer.mlp.fc2.weight, p + "mlp.fc2.bias": layer.mlp.fc2.bias})
        if layer.relative_position_bias is not None:
            sd[p + "attn.relative_position_bias_table"] = layer.relative_position_bias.relative_position_bias_table
        if isinstance(layer.lambda_1, torch.nn.Parameter):
            sd.update({p + "gamma_1": layer.lambda_1, p + "gamma_2": layer.lambda_2})
    model = model.double()
    model.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    return model.eval()


HF_CASES = {"hf_swin": (hf_swin, timm_swin_from_hf, 32),
            **{f"hf_beit_{v}": ((lambda v=v: hf_beit(v)), timm_beit_from_hf, 16) for v in BEIT_VARIANTS}}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_recorded_forward_gives_the_models_own_logits(case):
    build, _, size = HF_CASES[case]
    model = build()
    x = _images(3, size)
    with torch.no_grad():
        diff = _max_diff(as_adapter(model).run(x).logits, model(x).logits)
    assert diff < 1e-12, diff


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_maps_equal_timms_own_model_with_the_same_weights(case):
    """timm's own implementation with the weights copied by name gives the Hugging Face logits, and
    every checked method gives the same map on both (the Hugging Face model through the canonizer,
    timm's through its own adapter path)."""
    build, to_timm, size = HF_CASES[case]
    hf = build()
    ref = to_timm(hf)
    x = _images(2, size)
    with torch.no_grad():
        assert _max_diff(ref(x), hf(x).logits) < 1e-12
    for method in EXACT:
        got, want = explain(hf, x, method=method), explain(ref, x, method=method)
        assert torch.equal(got.target, want.target)
        scale = want.token_map.abs().max().item()
        assert _max_diff(got.token_map, want.token_map) <= 1e-10 * max(scale, 1.0), method


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_saliency_equals_autograd_on_the_original_model(case):
    build, _, size = HF_CASES[case]
    model = build()
    x = _images(2, size)
    g = _autograd_saliency(model, x)
    assert torch.allclose(explain(model, x, method="saliency").token_map, g.abs().amax(1), atol=1e-12, rtol=1e-9)
    assert torch.allclose(explain(model, x, method="input_x_gradient").token_map, (g * x).sum(1), atol=1e-12, rtol=1e-9)


def test_hf_swin_with_absolute_position_embeddings():
    model = hf_swin(use_absolute_embeddings=True)
    x = _images(2, 32)
    with torch.no_grad():
        assert _max_diff(as_adapter(model).run(x).logits, model(x).logits) < 1e-12
    g = _autograd_saliency(model, x)
    assert torch.allclose(explain(model, x, method="saliency").token_map, g.abs().amax(1), atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("method", [m for m in transexplain.list_methods() if m not in ("integrated_gradients", "smoothgrad")])
def test_hf_swin_and_beit_run_every_method_or_refuse(method):
    from transexplain.errors import UserError

    for model, size in ((hf_swin(), 32), (hf_beit(), 16)):
        try:
            out = explain(model, _images(2, size), method=method)
        except UserError as e:  # average-pooled: only the class-token methods refuse
            assert "class token" in str(e), (method, e)
            continue
        assert torch.isfinite(out.heatmap).all() and out.heatmap.shape == (2, size, size), method


# -- tx-bench explain on a saved model ---------------------------------------------------------------
def _tx(*args):
    return subprocess.run([sys.executable, "-m", "transexplain.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=300)


def _png(path, size):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size + 5, size + 3, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("family", ["swin", "beit"])
def test_cli_explain_on_a_saved_hf_folder(family, tmp_path):
    model = (hf_swin if family == "swin" else hf_beit)().float()
    model.save_pretrained(tmp_path / "m")
    size = model.config.image_size
    img = _png(tmp_path / "x.png", size)
    out = _tx("explain", img, "--model", f"hf:{tmp_path / 'm'}", "--method", "transformer_attribution", "--out", tmp_path / "o")
    assert out.returncode == 0, out.stderr
    assert "predicted class" in out.stdout
    raw = np.load(tmp_path / "o" / "x.transformer_attribution.npy")
    assert raw.shape == ((8, 8) if family == "swin" else (4, 4)) and np.isfinite(raw).all()


# -- independent AttnLRP: gradient x input of a hand-written forward with the rules' gradients --------
# With ε = 0, AttnLRP's rules are Gradient x Input of a forward in which every element-wise
# non-linearity (GELU, SiLU, an L2 normalisation) passes its own ratio f(x)/x as a constant, every
# LayerNorm holds σ constant, and every product of two activations (Q·Kᵀ, A·V, the SwiGLU gate)
# halves the gradient to each factor; linear maps (rotary embeddings included) and the softmax keep
# their true gradients (Achtibat et al. 2024). Written here from the models' parameters, without
# the package.
def _ratio(f, x):
    y = f(x)
    return x * torch.where(x == 0, torch.zeros_like(y), y / torch.where(x == 0, torch.ones_like(x), x)).detach()


def _ln_const_sigma(ln, x):
    mu = x.mean(-1, keepdim=True)
    sd = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps).detach()
    out = (x - mu) / sd
    return out * ln.weight + ln.bias if ln.weight is not None else out


def _half_product(a, b, op=torch.matmul):
    return 0.5 * (op(a, b.detach()) + op(a.detach(), b))


def _gradient_x_input(forward, x, target):
    x = x.clone().requires_grad_(True)
    logits = forward(x)
    (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
    return (g * x).sum(1).detach(), logits.detach()


# -- timm Swin V2 ------------------------------------------------------------------------------------
def swinv2(depths=(2, 2), seed=0):
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=32, patch_size=4, window_size=2,
                              embed_dim=8, depths=depths, num_heads=(1, 2), num_classes=3, drop_path_rate=0.0)
    return _spread(model, seed=seed)


def swinv2_attnlrp_forward(m):
    from timm.models.swin_transformer_v2 import window_partition, window_reverse

    def forward(x):
        h = _ln_const_sigma(m.patch_embed.norm, m.patch_embed.proj(x).permute(0, 2, 3, 1))
        for stage in m.layers:
            if not isinstance(stage.downsample, torch.nn.Identity):
                b_, hh, ww, c = h.shape  # timm's 2x2 merge order, then reduction and norm
                h = h.reshape(b_, hh // 2, 2, ww // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
                h = _ln_const_sigma(stage.downsample.norm, stage.downsample.reduction(h))
            for blk in stage.blocks:
                a = blk.attn
                b_, hh, ww, c = h.shape
                win, shift = blk.window_size, blk.shift_size
                n = win[0] * win[1]
                s = torch.roll(h, shifts=(-shift[0], -shift[1]), dims=(1, 2)) if any(shift) else h
                xw = window_partition(s, win).reshape(-1, n, c)
                qkv = torch.nn.functional.linear(xw, a.qkv.weight, torch.cat((a.q_bias, a.k_bias, a.v_bias)))
                q, k, v = qkv.reshape(xw.shape[0], n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
                norm = lambda t: torch.nn.functional.normalize(t, dim=-1)  # noqa: E731
                logits = _half_product(_ratio(norm, q), _ratio(norm, k).transpose(-2, -1))
                logits = logits * torch.clamp(a.logit_scale, max=np.log(100.0)).exp()
                table = a.cpb_mlp(a.relative_coords_table).view(-1, a.num_heads)
                bias = table[a.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
                logits = logits + 16 * torch.sigmoid(bias)
                if blk.attn_mask is not None:
                    nw = blk.attn_mask.shape[0]
                    logits = (logits.view(-1, nw, a.num_heads, n, n) + blk.attn_mask[None, :, None]).view(-1, a.num_heads, n, n)
                o = _half_product(logits.softmax(-1), v).transpose(1, 2).reshape(-1, n, c)
                o = window_reverse(a.proj(o).view(-1, win[0], win[1], c), win, (hh, ww))
                o = torch.roll(o, shifts=shift, dims=(1, 2)) if any(shift) else o
                h = h + _ln_const_sigma(blk.norm1, o)
                f = blk.mlp.fc2(_ratio(blk.mlp.act, blk.mlp.fc1(h)))
                h = h + _ln_const_sigma(blk.norm2, f)
        return m.head.fc(_ln_const_sigma(m.norm, h).mean((1, 2)))

    return forward


def test_swinv2_recorded_forward_gives_timms_logits():
    from transexplain.models.swin import SwinAdapter

    model = swinv2()
    adapter = as_adapter(model)
    assert isinstance(adapter, SwinAdapter) and adapter.v2
    assert [tuple(b.shift_size) for _, b in adapter.blocks] == [(0, 0), (1, 1), (0, 0), (1, 1)]
    x = _images(3, 32)
    with torch.no_grad():
        diff = _max_diff(adapter.run(x).logits, model(x))
    assert diff < 1e-12, diff


def test_swinv2_gradient_methods_equal_autograd():
    model = swinv2()
    x = _images(2, 32)
    g = _autograd_saliency(model, x)
    assert torch.allclose(explain(model, x, method="saliency").token_map, g.abs().amax(1), atol=1e-12, rtol=1e-9)
    assert torch.allclose(explain(model, x, method="input_x_gradient").token_map, (g * x).sum(1), atol=1e-12, rtol=1e-9)


def test_swinv2_attnlrp_equals_the_rules_as_gradient_x_input():
    model = swinv2()
    x = _images(2, 32)
    got = explain(model, x, method="attnlrp", epsilon=0.0)
    ref, logits = _gradient_x_input(swinv2_attnlrp_forward(model), x, got.target)
    assert _max_diff(logits, model(x).detach()) < 1e-12  # the hand-written forward is the model's
    assert _max_diff(got.token_map, ref) <= 1e-9 * ref.abs().max().item()


def _swin_dense(block_mats, blk, grid, n_batch):
    """(B, N, N) block matrices from per-window (B*nW, n, n) ones, laid out with timm's own window
    partition of the rolled grid of token ids."""
    from timm.models.swin_transformer_v2 import window_partition

    gh, gw = grid
    ids = torch.arange(gh * gw, dtype=torch.float64).reshape(1, gh, gw, 1)
    if any(blk.shift_size):
        ids = torch.roll(ids, shifts=(-blk.shift_size[0], -blk.shift_size[1]), dims=(1, 2))
    ids = window_partition(ids, blk.window_size).reshape(-1, blk.window_size[0] * blk.window_size[1]).long()
    n_win = ids.shape[0]
    dense = torch.zeros(n_batch, gh * gw, gh * gw, dtype=torch.float64)
    for s in range(n_batch):
        for w in range(n_win):
            idx = ids[w]
            dense[s][idx[:, None], idx[None, :]] += block_mats[s * n_win + w]
    return dense


def test_swinv2_transformer_attribution_from_the_models_own_attention_gradients():
    """Transformer Attribution on the last stage (start_layer 2): ∇A from timm's own forward (its
    softmax module's output), R^(b) from the relevance pass, the dense block matrices from timm's
    window partition; mean pooling reads the uniform row, the stage-2 map is handed to the 8x8
    grid by quarters."""
    from transexplain.lrp import OURS
    from transexplain.explainers.relevance import relevance_pass

    model = swinv2()
    x = _images(2, 32)
    probs = []

    def keep(mod, inp, out):
        out.retain_grad()
        probs.append(out)

    handles = [blk.attn.softmax.register_forward_hook(keep) for stage in model.layers for blk in stage.blocks]
    logits = model(x)
    target = logits.argmax(-1)
    logits.gather(1, target[:, None]).sum().backward()
    for h in handles:
        h.remove()
    adapter = as_adapter(model)
    _, _, result = relevance_pass(adapter, x, target, OURS, 2)
    blocks = [blk for stage in model.layers for blk in stage.blocks]
    v = torch.full((2, 16), 1 / 16, dtype=torch.float64)
    for b in (3, 2):
        m = (probs[b].grad * result.captured[("attn_value", b)]).clamp(min=0).mean(1)
        dense = _swin_dense(m, blocks[b], (4, 4), 2) + torch.eye(16, dtype=torch.float64)
        v = torch.bmm(v[:, None], dense)[:, 0]
    want = (v.reshape(2, 4, 4) / 4).repeat_interleave(2, 1).repeat_interleave(2, 2)
    got = explain(model, x, method="transformer_attribution", start_layer=2).token_map
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-9)


def test_swinv2_relevance_rules_conserve_node_by_node():
    """The ops a V2 block adds (post-norm, cosine attention, logit scale, position bias) are
    recorded with conservative kinds: Σ R_in = Σ R_out at every add and matmul (ours; the α=1,β=0
    linear rule loses the relevance of an output whose positive contributions are all zero, which
    8-wide random layers do have)."""
    from transexplain.lrp import OURS, propagate

    model = swinv2()
    x = _images(2, 32)
    trace = as_adapter(model).run(x, record=True)
    seed = torch.nn.functional.one_hot(trace.logits.argmax(-1), 3).to(x.dtype)
    seen = []

    def check(node, r_out, r_ins):
        if node.kind in ("add", "matmul"):
            seen.append(node.kind)
            ins = sum(r.sum() for r in r_ins if r is not None)
            assert abs(ins - r_out.sum()) <= 1e-6 * r_out.abs().sum() + 1e-12, (node.kind, node.tag)

    propagate(trace.tape, trace.logits, seed, OURS, on_node=check)
    assert seen.count("matmul") == 8


def test_swinv2_refuses_ln_stats_and_class_token_methods_with_the_reason():
    from transexplain.errors import UserError

    model = swinv2()
    for method, why in (("ln_stats", "LayerNorm input statistics"), ("bt_h", "class token")):
        with pytest.raises(UserError, match=why) as err:
            explain(model, _images(1, 32), method=method)
        assert "Swin V2" in str(err.value)


# -- timm EVA-02 -------------------------------------------------------------------------------------
EVA_VARIANTS = {
    "eva02-packed-swiglu": dict(),  # separate q/k/v, GluMlp (one fc1, two halves), rotary embeddings
    "swiglu-subln-fused": dict(qkv_fused=True, scale_mlp=True, init_values=0.5),  # SwiGLU with its sub-LN, layer scale
    "class-token-half-rope": dict(global_pool="token", rope_rotate_half=True),
}


def eva(variant="eva02-packed-swiglu", seed=0, **extra):
    import timm

    torch.manual_seed(seed)
    kw = {**EVA_VARIANTS.get(variant, {}), **extra}
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=16, patch_size=4, embed_dim=16,
                              depth=2, num_heads=2, num_classes=3, ref_feat_shape=(4, 4), **kw)
    return _spread(model, seed=seed)


def eva_attnlrp_forward(m):
    """EVA's forward with the AttnLRP gradients (see above); rotary embeddings keep their true
    (linear) gradient, the SwiGLU gate product halves it, SiLU passes its ratio."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    def forward(x):
        n_batch = x.shape[0]
        h = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
        h = torch.cat([m.cls_token.expand(n_batch, -1, -1), h], 1) + m.pos_embed
        rope = m.rope.get_embed()
        for blk in m.blocks:
            a = blk.attn
            z = _ln_const_sigma(blk.norm1, h)
            n = z.shape[1]
            if a.qkv is not None:
                qkv = torch.nn.functional.linear(z, a.qkv.weight, torch.cat((a.q_bias, a.k_bias, a.v_bias)))
                q, k, v = qkv.reshape(n_batch, n, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
            else:
                q, k, v = (lin(z).reshape(n_batch, n, a.num_heads, -1).transpose(1, 2) for lin in (a.q_proj, a.k_proj, a.v_proj))
            half = a.rotate_half
            q = torch.cat([q[:, :, :1], apply_rot_embed_cat(q[:, :, 1:], rope, half=half)], 2)
            k = torch.cat([k[:, :, :1], apply_rot_embed_cat(k[:, :, 1:], rope, half=half)], 2)
            att = _half_product(q * a.scale, k.transpose(-2, -1)).softmax(-1)
            o = _half_product(att, v).transpose(1, 2).reshape(n_batch, n, -1)
            if not isinstance(a.norm, torch.nn.Identity):
                o = _ln_const_sigma(a.norm, o)
            o = a.proj(o)
            h = h + (blk.gamma_1 * o if blk.gamma_1 is not None else o)
            z = _ln_const_sigma(blk.norm2, h)
            mlp = blk.mlp
            if hasattr(mlp, "fc1_g"):
                f = _half_product(_ratio(mlp.act, mlp.fc1_g(z)), mlp.fc1_x(z), torch.mul)
            else:
                g, u = mlp.fc1(z).chunk(2, -1)
                f = _half_product(_ratio(mlp.act, g), u, torch.mul)
            if not isinstance(mlp.norm, torch.nn.Identity):
                f = _ln_const_sigma(mlp.norm, f)
            f = mlp.fc2(f)
            h = h + (blk.gamma_2 * f if blk.gamma_2 is not None else f)
        if m.global_pool == "avg":
            return m.head(_ln_const_sigma(m.fc_norm, h[:, 1:].mean(1)))
        return m.head(_ln_const_sigma(m.norm, h)[:, 0])

    return forward


@pytest.mark.parametrize("variant", list(EVA_VARIANTS))
def test_eva_recorded_forward_gives_timms_logits(variant):
    from transexplain.models.eva import EvaAdapter

    model = eva(variant)
    assert model.rope is not None
    adapter = as_adapter(model)
    assert isinstance(adapter, EvaAdapter)
    x = _images(3)
    with torch.no_grad():
        diff = _max_diff(adapter.run(x).logits, model(x))
    assert diff < 1e-12, diff


@pytest.mark.parametrize("variant", list(EVA_VARIANTS))
def test_eva_gradient_methods_equal_autograd(variant):
    model = eva(variant)
    x = _images(2)
    g = _autograd_saliency(model, x)
    assert torch.allclose(explain(model, x, method="saliency").token_map, g.abs().amax(1), atol=1e-12, rtol=1e-9)
    assert torch.allclose(explain(model, x, method="input_x_gradient").token_map, (g * x).sum(1), atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("variant", list(EVA_VARIANTS))
def test_eva_attnlrp_equals_the_rules_as_gradient_x_input(variant):
    model = eva(variant)
    x = _images(2)
    got = explain(model, x, method="attnlrp", epsilon=0.0)
    ref, logits = _gradient_x_input(eva_attnlrp_forward(model), x, got.target)
    assert _max_diff(logits, model(x).detach()) < 1e-12  # the hand-written forward is the model's
    assert _max_diff(got.token_map, ref) <= 1e-9 * ref.abs().max().item()


def test_eva_without_rotary_and_swiglu_gives_the_plain_vits_maps():
    """An Eva without rotary embeddings and with the plain MLP computes a timm ViT: with the weights
    copied, every checked method gives the ViT's map (the ViT's maps are checked against the NumPy
    brute force in tests/test_vit_exact.py)."""
    from conftest import make_vit

    model = eva("plain", use_rot_pos_emb=False, swiglu_mlp=False, qkv_fused=True, global_pool="token", mlp_ratio=2.0)
    vit = make_vit(depth=2, heads=2, dim=16, classes=3, mlp_ratio=2.0)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith("attn.k_bias"):
            continue
        if k.endswith("attn.q_bias"):
            pre = k[: -len("q_bias")]
            v = torch.cat([v, torch.zeros_like(v), model.state_dict()[pre + "v_bias"]])
            k = pre + "qkv.bias"
        elif k.endswith("attn.v_bias"):
            continue
        sd[k] = v.clone()
    vit.load_state_dict(sd, strict=True)
    x = _images(2)
    with torch.no_grad():
        assert _max_diff(vit(x), model(x)) < 1e-12
    for method in EXACT:
        got, want = explain(model, x, method=method), explain(vit, x, method=method)
        assert _max_diff(got.token_map, want.token_map) <= 1e-10 * max(want.token_map.abs().max().item(), 1.0), method


def test_eva_transformer_attribution_from_the_models_own_attention_gradients():
    """With rotary embeddings and SwiGLU: ∇A from timm's own (unfused) forward, R^(b) from the
    relevance pass, rollout of mean-head (∇A ⊙ R)⁺ + I from block 1 read off the uniform row."""
    from transexplain.explainers.relevance import relevance_pass
    from transexplain.lrp import OURS

    model = eva()
    probs = []

    def keep(mod, inp, out):
        inp[0].retain_grad()
        probs.append(inp[0])

    handles = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(keep))
    x = _images(2)
    logits = model(x)
    target = logits.argmax(-1)
    logits.gather(1, target[:, None]).sum().backward()
    for h in handles:
        h.remove()
    _, _, result = relevance_pass(as_adapter(model), x, target, OURS, 1)
    m = (probs[1].grad * result.captured[("attn_value", 1)]).clamp(min=0).mean(1) + torch.eye(17, dtype=torch.float64)
    v = torch.full((2, 17), 1 / 16, dtype=torch.float64)
    v[:, 0] = 0
    want = torch.bmm(v[:, None], m)[:, 0, 1:].reshape(2, 4, 4)
    got = explain(model, x, method="transformer_attribution").token_map
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-9)


def test_eva_refuses_the_class_token_methods_with_the_reason():
    from transexplain.errors import UserError

    with pytest.raises(UserError, match="EVA models.*class token"):
        explain(eva(), _images(1), method="bt_h")
