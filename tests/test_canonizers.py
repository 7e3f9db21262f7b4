"""Hugging Face ViT / DeiT and torchvision ViT through the timm-layout canonizer: the recorded
forward gives the model's own logits, and maps equal computations made on the original model."""
import pytest
import torch

from transexplain import explain, list_methods
from transexplain.errors import UserError
from transexplain.models import as_adapter

from conftest import rollout_reference


def _spread(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1 + 0.1 * noise if ("norm" in name or "ln_" in name) and name.endswith("weight") else 0.5 * noise)
    return model.double().eval()


def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    return _spread(ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2,
                                                       num_attention_heads=2, intermediate_size=32, num_labels=5)))


def hf_deit_teacher():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    return _spread(DeiTForImageClassificationWithTeacher(DeiTConfig(image_size=16, patch_size=4, hidden_size=16,
                                                                    num_hidden_layers=2, num_attention_heads=2,
                                                                    intermediate_size=32, num_labels=5)))


def torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    return _spread(VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                                     num_classes=5))


BUILDERS = {"hf_vit": hf_vit, "hf_deit_teacher": hf_deit_teacher, "torchvision_vit": torchvision_vit}


def logits_of(model, x):
    out = model(x)
    return getattr(out, "logits", out)


def images(n=2):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_recorded_forward_gives_the_models_own_logits(family):
    model = BUILDERS[family]()
    x = images(3)
    with torch.no_grad():
        diff = (as_adapter(model).run(x).logits - logits_of(model, x)).abs().max().item()
    assert diff < 1e-12, diff


@pytest.mark.parametrize("family", list(BUILDERS))
def test_saliency_equals_autograd_on_the_original_model(family):
    model = BUILDERS[family]()
    x = images().requires_grad_(True)
    logits = logits_of(model, x)
    t = logits.argmax(-1)
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), x)
    got = explain(model, x.detach(), method="saliency").token_map
    assert torch.allclose(got, g.abs().amax(1), atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("family", ["hf_vit", "hf_deit_teacher"])
def test_rollout_equals_rollout_of_the_attentions_transformers_returns(family):
    """Hugging Face returns each layer's attention probabilities (output_attentions): rollout from
    those, read off the class row (DeiT: the mean of the class and distillation rows)."""
    model = BUILDERS[family]()
    model.config._attn_implementation = "eager"
    x = images()
    with torch.no_grad():
        atts = model(x, output_attentions=True).attentions
    joint = rollout_reference(atts[1:])
    prefix = 2 if family == "hf_deit_teacher" else 1
    row = joint[:, :prefix].mean(1)
    got = explain(model, x, method="rollout").token_map
    assert torch.allclose(got, row[:, prefix:].reshape(2, 4, 4), atol=1e-12)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_every_method_runs_and_maps_the_patches(family):
    model = BUILDERS[family]()
    x = images()
    for method in list_methods():
        if method in ("integrated_gradients", "smoothgrad"):
            continue  # the same gradient path as saliency, only slower
        try:
            out = explain(model, x, method=method)
        except UserError as e:  # only a class-token method on the distilled model may refuse
            assert family == "hf_deit_teacher" and "class token" in str(e), (method, e)
            continue
        assert out.heatmap.shape == (2, 16, 16) and torch.isfinite(out.heatmap).all(), method
        assert out.token_map.shape in ((2, 4, 4), (2, 16, 16)), method


def test_the_user_model_is_not_modified():
    model = hf_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    explain(model, images(), method="transformer_attribution", precision="float32")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_load_hf_folder_and_torchvision_names(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    from transexplain.models.loading import load_model

    torch.manual_seed(0)
    hf = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=32, num_labels=3,
                                             id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2}))
    hf.save_pretrained(tmp_path / "m")
    loaded = load_model(f"hf:{tmp_path / 'm'}")
    assert loaded.class_names == ["a", "b", "c"] and loaded.input_size == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), hf.eval()(x).logits, atol=1e-6)
    rnd = load_model(f"hf:{tmp_path / 'm'}", random_weights=True)
    assert rnd.weights == "random-init"
    tv = load_model("torchvision:vit_b_32", random_weights=True)
    assert tv.input_size == (3, 224, 224) and len(tv.class_names) == 1000 and tv.mean == (0.485, 0.456, 0.406)
    with pytest.raises(UserError, match="hf:|Hugging Face"):
        load_model(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(UserError, match="torchvision has no model"):
        load_model("torchvision:no_such_vit", random_weights=True)


@pytest.mark.parametrize("kw", [dict(), dict(use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=True),
                                dict(global_pool="token", init_values=None)], ids=["avg-relpos", "shared-relpos", "token"])
def test_timm_beit_logits_and_rollout_from_its_own_attention(kw):
    """BEiT: relative position biases added to the attention logits, q/v biases, layer scale; rollout
    from the probabilities timm's own (unfused) attention computes."""
    import timm

    torch.manual_seed(0)
    model = _spread(timm.create_model("beit_base_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=16,
                                      depth=2, num_heads=2, num_classes=5, **kw))
    probs = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda mod, inp, out: probs.append(inp[0].detach()))
    x = images()
    with torch.no_grad():
        want = model(x)
    adapter = as_adapter(model)
    with torch.no_grad():
        assert (adapter.run(x).logits - want).abs().max().item() < 1e-12
    joint = rollout_reference(probs[1:])
    row = joint[:, 0] if adapter.pool == "token" else joint[:, 1:].mean(1)
    assert torch.allclose(explain(model, x, method="rollout").token_map, row[:, 1:].reshape(2, 4, 4), atol=1e-12)
