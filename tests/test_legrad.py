"""LeGrad: equal to finite differences of a hand-written forward, equal to the legrad-torch package
(1.1) on the same weights, batch-invariant and class-specific."""
import pytest
import torch
import torch.nn.functional as F

import transexplain
from transexplain.explainers import normalise_per_sample, upsample
from transexplain.explainers.legrad import LeGrad
from transexplain.models.vit import ViTAdapter

from conftest import make_vit


# -- an independent forward of a timm ViT, written from its parameters ---------------------------
def _ln(mod, t):
    return F.layer_norm(t, mod.normalized_shape, mod.weight, mod.bias, mod.eps)


def _attention_input(model, x, layer):
    """Tokens entering block `layer` (B, N, D) and that block's attention map (B, H, N, N)."""
    conv = model.patch_embed.proj
    h = F.conv2d(x, conv.weight, conv.bias, stride=conv.stride).flatten(2).transpose(1, 2)
    h = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), h], 1) + model.pos_embed
    for b, blk in enumerate(model.blocks):
        heads = blk.attn.num_heads
        n_batch, n, d = h.shape
        qkv = F.linear(_ln(blk.norm1, h), blk.attn.qkv.weight, blk.attn.qkv.bias)
        q, k, v = qkv.reshape(n_batch, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        if b == layer:
            return h, att, v
        h = _finish_block(blk, h, att, v)
    raise AssertionError


def _finish_block(blk, h, att, v):
    n_batch, n, d = h.shape
    out = (att @ v).transpose(1, 2).reshape(att.shape[0], n, d)
    h = h + F.linear(out, blk.attn.proj.weight, blk.attn.proj.bias)
    m = F.gelu(F.linear(_ln(blk.norm2, h), blk.mlp.fc1.weight, blk.mlp.fc1.bias))
    return h + F.linear(m, blk.mlp.fc2.weight, blk.mlp.fc2.bias)


def _layer_score(model, layer, h, att, v, cls):
    """s^l_c as a function of layer l's attention map (att may carry extra leading perturbations)."""
    z = _finish_block(model.blocks[layer], h.expand(att.shape[0], -1, -1), att, v.expand(att.shape[0], -1, -1, -1))
    return F.linear(_ln(model.norm, z[:, 0]), model.head.weight, model.head.bias)[:, cls]


def brute_force_legrad(model, x, target, start=0, step=1e-5):
    """The definition by central differences: every entry of every layer's attention map perturbed."""
    maps = []
    for i in range(x.shape[0]):
        per_layer = []
        for layer in range(start, len(model.blocks)):
            h, att, v = _attention_input(model, x[i:i + 1], layer)
            n_entries = att.numel()
            eye = torch.eye(n_entries, dtype=att.dtype).reshape(n_entries, *att.shape[1:])
            plus = _layer_score(model, layer, h, att + step * eye, v, int(target[i]))
            minus = _layer_score(model, layer, h, att - step * eye, v, int(target[i]))
            grad = ((plus - minus) / (2 * step)).reshape(att.shape[1:])  # (H, N, N)
            per_layer.append(grad.clamp(min=0).mean(0).mean(0))  # heads, then query rows
        maps.append(torch.stack(per_layer).mean(0)[1:])
    return torch.stack(maps)


def test_equals_finite_differences_of_an_independent_forward():
    model = make_vit(depth=3, heads=2, dim=16, classes=5)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for target, start in ((None, 0), ([3, 1], 1)):
        ours = transexplain.explain(model, x, "legrad", target=target, start_layer=start)
        expected = brute_force_legrad(model, x, ours.target, start=start).reshape(ours.token_map.shape)
        scale = expected.abs().max()
        assert scale > 0
        # central differences of a function that is smooth in A: truncation ~ step² · |∂³s| ≈ 1e-10
        assert (ours.token_map - expected).abs().max() <= 1e-6 * scale, (ours.token_map - expected).abs().max() / scale


# -- the public implementation, legrad-torch 1.1, on an open_clip ViT with the same weights ---------
def _tiny_clip_and_timm():
    open_clip = pytest.importorskip("open_clip")
    import timm
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    clip = CLIP(embed_dim=8, vision_cfg=CLIPVisionCfg(layers=3, width=24, head_width=8, patch_size=4, image_size=16),
                text_cfg=CLIPTextCfg(context_length=4, vocab_size=10, width=8, heads=2, layers=1)).double().eval()
    with torch.no_grad():
        for name, p in clip.visual.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight") and "ln" in name else 0.5 * torch.randn_like(p))
    vis = clip.visual
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=24, depth=3,
                            num_heads=3, num_classes=4, qkv_bias=True, pre_norm=True).double().eval()
    with torch.no_grad():
        vit.patch_embed.proj.weight.copy_(vis.conv1.weight)
        assert vit.patch_embed.proj.bias is None  # as open_clip's conv1 (timm's pre_norm ViT)
        vit.cls_token.copy_(vis.class_embedding.view(1, 1, -1))
        vit.pos_embed.copy_(vis.positional_embedding.view(1, 17, 24))
        pairs = [(vit.norm_pre, vis.ln_pre), (vit.norm, vis.ln_post)]
        for blk, res in zip(vit.blocks, vis.transformer.resblocks):
            pairs += [(blk.norm1, res.ln_1), (blk.norm2, res.ln_2)]
            blk.attn.qkv.weight.copy_(res.attn.in_proj_weight)
            blk.attn.qkv.bias.copy_(res.attn.in_proj_bias)
            blk.attn.proj.weight.copy_(res.attn.out_proj.weight)
            blk.attn.proj.bias.copy_(res.attn.out_proj.bias)
            blk.mlp.fc1.weight.copy_(res.mlp.c_fc.weight)
            blk.mlp.fc1.bias.copy_(res.mlp.c_fc.bias)
            blk.mlp.fc2.weight.copy_(res.mlp.c_proj.weight)
            blk.mlp.fc2.bias.copy_(res.mlp.c_proj.bias)
        for ours, theirs in pairs:
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
            ours.eps = theirs.eps
    return clip, vit


class _ClipReadout(LeGrad):
    """LeGrad read the way the package's CLIP path reads a layer: the mean of all tokens, ln_post,
    the projection, L2-normalised, dotted with normalised class ("text") embeddings."""

    def __init__(self, proj, text, **options):
        super().__init__(**options)
        self.proj, self.text = proj, text

    def layer_logits(self, adapter, trace, layer):
        pooled = adapter.model.norm(trace.extras["hidden"][layer].mean(1))
        return F.normalize(pooled @ self.proj, dim=-1) @ self.text.T


@pytest.mark.parametrize("layer_index", [0, -2])
def test_equals_the_legrad_torch_package(layer_index, capsys):
    pytest.importorskip("legrad")
    from legrad import LeWrapper

    clip, vit = _tiny_clip_and_timm()
    text = F.normalize(torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2)), dim=-1)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    proj = clip.visual.proj.detach().clone()
    # the timm copy computes what the open_clip model computes (ln_post on the class token, proj)
    with torch.no_grad():
        ref = clip.encode_image(x)
        tokens = vit.forward_features(x)
    assert torch.allclose(tokens[:, 0] @ proj, ref, atol=1e-10)

    adapter = ViTAdapter(vit)
    method = _ClipReadout(proj, text, start_layer=layer_index)
    wrapped = LeWrapper(clip, layer_index=layer_index)
    worst = 0.0
    for cls in range(text.shape[0]):
        target = torch.full((x.shape[0],), cls)
        scores, _, _ = method.scores(adapter, x, target)
        ours = normalise_per_sample(upsample(adapter.to_token_map(scores), (16, 16)))
        for i in range(x.shape[0]):
            theirs = wrapped.compute_legrad_clip(text_embedding=text[cls:cls + 1], image=x[i:i + 1]).detach()[0, 0]
            worst = max(worst, float((ours[i] - theirs).abs().max()))
    capsys.readouterr()
    # both in float64, the same operations in another order: the difference is rounding (~1e-15)
    print("max |ours - legrad-torch|:", worst)
    assert worst <= 1e-10, worst


# -- the explainer contract ----------------------------------------------------------------------
def test_batch_invariant_and_class_specific(vit64):
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    whole = transexplain.explain(vit64, x, "legrad", target=2)
    for i in range(4):
        alone = transexplain.explain(vit64, x[i:i + 1], "legrad", target=2)
        assert torch.equal(alone.token_map[0], whole.token_map[i]) or \
            (alone.token_map[0] - whole.token_map[i]).abs().max() <= 1e-12 * whole.token_map[i].abs().max()
    other = transexplain.explain(vit64, x, "legrad", target=4)
    assert (other.token_map - whole.token_map).abs().amax((1, 2)).min() > 1e-3 * whole.token_map.abs().max()
    assert (whole.token_map >= 0).all()


def test_finite_on_black_image_in_both_precisions_and_on_swin():
    from transexplain.models.loading import load_model
    from transexplain.precision import adapter_at

    for spec in ("embedded", "embedded-swin"):
        model = load_model(spec).model
        adapter = adapter_at(model, "float64")
        c, h, w = adapter.input_size
        mean, std = torch.tensor(adapter.mean).view(3, 1, 1), torch.tensor(adapter.std).view(3, 1, 1)
        black = ((torch.zeros(c, h, w) - mean) / std).expand(2, c, h, w)
        noise = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(5))
        for precision in ("float64", "float32"):
            for x in (black, noise):
                r = transexplain.explain(model, x, "legrad", precision=precision)
                assert r.token_map.isfinite().all() and r.heatmap.isfinite().all()
        assert (r.token_map.abs().amax((1, 2)) > 0).all()


def test_bad_start_layer_is_one_sentence(vit64):
    from transexplain.errors import UserError

    with pytest.raises(UserError, match="start_layer"):
        transexplain.explain(vit64, torch.zeros(1, 3, 16, 16, dtype=torch.float64), "legrad", start_layer=5)


def test_text_padding_batch_invariance_and_target():
    from test_text_adapter import padded_batch, tiny_bert
    from transexplain.models.text import TextAdapter

    adapter = TextAdapter(tiny_bert())
    ids, mask = padded_batch()
    target = torch.tensor([0, 1, 2])
    e = transexplain.explain(adapter, {"input_ids": ids, "attention_mask": mask}, "legrad", target=target)
    assert e.token_map.isfinite().all() and (e.token_map[mask == 0] == 0).all()
    for i in range(3):
        n = int(mask[i].sum())
        one = transexplain.explain(adapter, {"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n]}, "legrad",
                                   target=target[i:i + 1])
        assert (e.token_map[i, :n] - one.token_map[0]).abs().max() <= 1e-12 * one.token_map.abs().max()
    other = transexplain.explain(adapter, {"input_ids": ids, "attention_mask": mask}, "legrad", target=torch.tensor([2, 0, 1]))
    assert (other.token_map - e.token_map).abs().max() > 1e-6 * e.token_map.abs().max()
