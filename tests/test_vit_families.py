"""timm ViT variants with other token layouts: DeiT-distilled (class + distillation token), register
tokens, global average pooling (with and without a class token), position embeddings without the
prefix tokens (DeiT-3). Each against timm's own forward and independent computations."""
import pytest
import torch

from transexplain import explain, list_methods
from transexplain.errors import UserError
from transexplain.models import as_adapter

from conftest import make_vit, rollout_reference

FAMILIES = {
    "deit_distilled": dict(arch="deit_tiny_distilled_patch16_224"),
    "registers": dict(reg_tokens=4),
    "gap": dict(class_token=False, global_pool="avg"),
    "gap_with_cls": dict(global_pool="avg"),
    "no_embed_class": dict(no_embed_class=True, reg_tokens=2),
}
PREFIX = {"deit_distilled": 2, "registers": 5, "gap": 0, "gap_with_cls": 1, "no_embed_class": 3}


def build(family):
    kw = dict(FAMILIES[family])
    arch = kw.pop("arch", None)
    if arch is None:
        return make_vit(depth=2, heads=2, dim=16, **kw)
    import timm

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, img_size=(16, 16), patch_size=4, embed_dim=16, depth=2,
                              num_heads=2, num_classes=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1 + 0.1 * torch.randn_like(p)) if "norm" in name and name.endswith("weight") else 0.5 * torch.randn_like(p))
    return model.double().eval()


def images(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_recorded_forward_gives_timms_logits(family):
    model = build(family)
    adapter = as_adapter(model)
    assert adapter.prefix == PREFIX[family]
    x = images()
    with torch.no_grad():
        diff = (adapter.run(x).logits - model(x)).abs().max().item()
    assert diff < 1e-12, diff


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_maps_only_the_patch_tokens(family):
    model = build(family)
    adapter = as_adapter(model)
    x = images(2)
    for method in list_methods():
        if method in ("integrated_gradients", "smoothgrad"):
            continue  # pixel-level like saliency (checked below), only slower
        try:
            out = explain(model, x, method=method)
        except UserError as e:
            assert "class token" in str(e) and adapter.pool != "token", (family, method, e)
            continue
        if not get_pixel_level(method):
            assert out.token_map.shape == (2, 4, 4), (family, method)
        assert torch.isfinite(out.heatmap).all(), (family, method)


def get_pixel_level(method):
    from transexplain.explainers import get_method

    cls = get_method(method)
    return cls.pixel_level or cls.name in ("saliency", "input_x_gradient", "full_lrp", "attnlrp", "cp_lrp")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saliency_equals_plain_autograd_on_the_model(family):
    model = build(family)
    x = images(2).requires_grad_(True)
    logits = model(x)
    target = logits.argmax(-1)
    (grad,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x)
    want = grad.abs().amax(1)  # |dy/dx|, max over the colour channels
    got = explain(model, x.detach(), method="saliency").token_map
    assert torch.allclose(got, want, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_rollout_from_timms_own_attention_maps(family):
    """Rollout from the attention probabilities timm's own (unfused) forward computes, read off the
    row(s) the classifier uses: the class token, the mean of class and distillation tokens, or the
    mean over the pooled tokens."""
    model = build(family)
    probs = []
    hooks = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        hooks.append(blk.attn.attn_drop.register_forward_hook(lambda mod, inp, out: probs.append(inp[0].detach())))
    x = images(2)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    prefix = PREFIX[family]
    joint = rollout_reference(probs[1:])  # the vision default starts at block 1
    pool = as_adapter(model).pool
    if pool == "token":
        row = joint[:, 0]
    elif pool == "distilled":
        row = (joint[:, 0] + joint[:, 1]) / 2
    else:
        start = 0 if getattr(model, "pool_include_prefix", False) else prefix
        row = joint[:, start:].mean(1)
    want = row[:, prefix:].reshape(2, 4, 4)
    got = explain(model, x, method="rollout").token_map
    assert torch.allclose(got, want, atol=1e-12)


def test_attention_pooling_is_refused_with_the_reason():
    model = make_vit(global_pool="map")
    with pytest.raises(UserError, match="MAP head"):
        as_adapter(model)


@pytest.mark.parametrize("method", ["rollout", "transformer_attribution", "ln_stats"])
def test_default_start_layer_is_clamped_on_a_one_block_vit(method):
    """The reference's default start layer (1: skip the first block) would leave nothing to propagate
    on a one-block model; the default then starts at its only block, which equals start_layer=0."""
    import timm

    from transexplain import explain

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=16,
                              depth=1, num_heads=2, num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16)
    default = explain(model, x, method=method).token_map
    explicit = explain(model, x, method=method, start_layer=0).token_map
    assert torch.isfinite(default).all()
    assert torch.equal(default, explicit)
