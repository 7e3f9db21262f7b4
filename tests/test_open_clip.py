"""open_clip (OpenCLIP) image towers as zero-shot classifiers (models/open_clip.py): the logits are
open_clip's own image-text logits, and the maps equal those of the same weights in Hugging Face's
CLIP and in a timm ViT."""
import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from transexplain import explain  # noqa: E402
from transexplain.errors import UserError  # noqa: E402
from transexplain.models.canonizers import clip_vit  # noqa: E402
from transexplain.models.loading import load_model  # noqa: E402
from transexplain.models.open_clip import open_clip_vit, save_folder, text_embeddings, zero_shot_classifier  # noqa: E402

from conftest import rollout_reference  # noqa: E402

CLASSES = ["cat", "dog", "car"]
PROMPT = "a photo of a {}"
TEXT = dict(context_length=16, vocab_size=49408, width=16, heads=2, layers=1)
#: class-token pooling, QuickGELU (OpenAI's CLIP layout)
TOK = dict(embed_dim=8, quick_gelu=True, text_cfg=TEXT,
           vision_cfg=dict(image_size=16, patch_size=4, width=16, layers=2, head_width=8, mlp_ratio=2.0))
#: average pooling with ln_post after the pool, layer scale, no ln_pre, GELU
AVG = dict(embed_dim=8, text_cfg=TEXT,
           vision_cfg=dict(image_size=16, patch_size=4, width=16, layers=2, head_width=8, mlp_ratio=2.0, pool_type="avg",
                           final_ln_after_pool=True, ls_init_value=0.5, no_ln_pre=True))


def tiny(cfg, seed=0):
    """A tiny open_clip CLIP, weights spread so that attention is peaked (float32, as loaded)."""
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    model = CLIP(**cfg).eval()
    with torch.no_grad():
        for name, p in model.visual.named_parameters():
            p.copy_((1 + 0.1 * torch.randn_like(p)) if ("ln" in name and name.endswith("weight")) or "ls_" in name
                    else 0.5 * torch.randn_like(p))
    return model


@functools.lru_cache(maxsize=None)
def tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=TEXT["context_length"])


def own_logits(model, x):
    """open_clip's own forward: logit_scale · (normalised image features) · (normalised text features)ᵀ."""
    m = model.double()
    with torch.no_grad():
        out = m(x, tokenizer()([PROMPT.format(c) for c in CLASSES]))
    img, txt, scale = (out["image_features"], out["text_features"], out["logit_scale"]) if isinstance(out, dict) else out
    return scale * img @ txt.T


@pytest.mark.parametrize("cfg", [TOK, AVG], ids=["tok", "avg"])
def test_logits_are_open_clips_own_image_text_logits(cfg):
    model = tiny(cfg)
    view = zero_shot_classifier(model, tokenizer(), CLASSES, PROMPT)
    assert view.class_names == CLASSES and view.canonized_from == "open_clip.CLIP"
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    got = explain(view, x, method="rollout").logits
    want = own_logits(model, x)
    assert (got - want).abs().max().item() < 1e-12


@pytest.mark.parametrize("cfg", [TOK, AVG], ids=["tok", "avg"])
def test_saliency_and_input_x_gradient_equal_autograd_on_the_open_clip_model(cfg):
    model = tiny(cfg).double()
    view = zero_shot_classifier(model, tokenizer(), CLASSES, PROMPT)
    with torch.no_grad():
        txt = torch.nn.functional.normalize(model.encode_text(tokenizer()([PROMPT.format(c) for c in CLASSES])), dim=-1)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    logits = model.logit_scale.exp() * torch.nn.functional.normalize(model.encode_image(x), dim=-1) @ txt.T
    t = logits.argmax(-1)
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), x)
    assert torch.allclose(explain(view, x.detach(), method="saliency").token_map, g.abs().amax(1), atol=1e-12, rtol=1e-9)
    ixg = explain(view, x.detach(), method="input_x_gradient").token_map
    assert torch.allclose(ixg, (g * x.detach()).sum(1), atol=1e-12, rtol=1e-9)


def test_rollout_equals_rollout_of_open_clips_own_attention():
    model = tiny(TOK).double()
    view = zero_shot_classifier(model, tokenizer(), CLASSES, PROMPT)
    inputs = []
    hooks = [r.ln_1.register_forward_hook(lambda mod, inp, out: inputs.append(out.detach()))
             for r in model.visual.transformer.resblocks]
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        model.encode_image(x)
    for h in hooks:
        h.remove()
    atts = []
    for r, h in zip(model.visual.transformer.resblocks, inputs):
        h = h.transpose(0, 1) if h.shape[0] != 2 else h  # open_clip 2.x runs the blocks sequence-first
        q, k, _ = torch.nn.functional.linear(h, r.attn.in_proj_weight, r.attn.in_proj_bias).chunk(3, dim=-1)
        q, k = (t.reshape(2, t.shape[1], r.attn.num_heads, -1).transpose(1, 2) for t in (q, k))
        atts.append(torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1))
    joint = rollout_reference(atts[1:])
    assert torch.allclose(explain(view, x, method="rollout").token_map, joint[:, 0, 1:].reshape(2, 4, 4), atol=1e-12)


def as_hf_clip(model):
    """A Hugging Face CLIPModel whose image tower holds `model`'s weights (copied by name)."""
    from transformers import CLIPConfig, CLIPModel

    v = model.visual
    quick = type(v.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    config = CLIPConfig(text_config=dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=20, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1),
                        vision_config=dict(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=32,
                                           hidden_act="quick_gelu" if quick else "gelu"),
                        projection_dim=8)
    hf = CLIPModel(config).double().eval()
    vm = hf.vision_model
    with torch.no_grad():
        vm.embeddings.class_embedding.copy_(v.class_embedding)
        vm.embeddings.patch_embedding.weight.copy_(v.conv1.weight)
        vm.embeddings.position_embedding.weight.copy_(v.positional_embedding)
        vm.pre_layrnorm.load_state_dict(v.ln_pre.state_dict())
        vm.post_layernorm.load_state_dict(v.ln_post.state_dict())
        for layer, r in zip(vm.encoder.layers, v.transformer.resblocks):
            for proj, w, b in zip((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                                  r.attn.in_proj_weight.chunk(3), r.attn.in_proj_bias.chunk(3)):
                proj.weight.copy_(w)
                proj.bias.copy_(b)
            layer.self_attn.out_proj.load_state_dict(r.attn.out_proj.state_dict())
            layer.layer_norm1.load_state_dict(r.ln_1.state_dict())
            layer.layer_norm2.load_state_dict(r.ln_2.state_dict())
            layer.mlp.fc1.load_state_dict(r.mlp.c_fc.state_dict())
            layer.mlp.fc2.load_state_dict(r.mlp.c_proj.state_dict())
        hf.visual_projection.weight.copy_(v.proj.T)
        hf.logit_scale.copy_(model.logit_scale)
    return hf


def as_timm_vit(model, text):
    """A timm ViT (average pooling with fc_norm, layer scale, no norm_pre) holding `model`'s image
    tower's weights (copied by name), with the zero-shot head."""
    import timm

    from transexplain.models.canonizers import ZeroShotHead

    v = model.visual
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=16, depth=2,
                            num_heads=2, mlp_ratio=2.0, global_pool="avg", init_values=0.5, num_classes=0,
                            norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-5)).double().eval()
    assert isinstance(vit.norm, torch.nn.Identity) and not vit.has_class_token is False
    with torch.no_grad():
        vit.patch_embed.proj.weight.copy_(v.conv1.weight)
        vit.patch_embed.proj.bias.zero_()
        vit.cls_token.copy_(v.class_embedding.view(1, 1, -1))
        vit.pos_embed.copy_(v.positional_embedding.unsqueeze(0))
        for blk, r in zip(vit.blocks, v.transformer.resblocks):
            blk.norm1.load_state_dict(r.ln_1.state_dict())
            blk.norm2.load_state_dict(r.ln_2.state_dict())
            blk.attn.qkv.weight.copy_(r.attn.in_proj_weight)
            blk.attn.qkv.bias.copy_(r.attn.in_proj_bias)
            blk.attn.proj.load_state_dict(r.attn.out_proj.state_dict())
            blk.ls1.gamma.copy_(r.ls_1.gamma)
            blk.ls2.gamma.copy_(r.ls_2.gamma)
            blk.mlp.fc1.load_state_dict(r.mlp.c_fc.state_dict())
            blk.mlp.fc2.load_state_dict(r.mlp.c_proj.state_dict())
        vit.fc_norm.load_state_dict(v.ln_post.state_dict())
    proj = torch.nn.Linear(16, 8, bias=False).double()
    with torch.no_grad():
        proj.weight.copy_(v.proj.T)
    vit.head = ZeroShotHead(proj, text, model.logit_scale)
    vit.num_classes = text.shape[0]
    return vit


METHODS = ["transformer_attribution", "attnlrp", "saliency", "full_lrp", "cp_lrp", "generic_attention"]


def test_maps_equal_hugging_face_clip_with_the_same_weights():
    model = tiny(TOK).double()
    text = text_embeddings(model, tokenizer(), [PROMPT.format(c) for c in CLASSES])
    ours, theirs = open_clip_vit(model, text), clip_vit(as_hf_clip(model), text)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert (explain(ours, x, method="rollout").logits - own_logits(model, x)).abs().max() < 1e-12
    for method in METHODS:
        a, b = explain(ours, x, method=method), explain(theirs, x, method=method)
        assert (a.logits - b.logits).abs().max() < 1e-12, method
        scale = b.token_map.abs().max()
        assert (a.token_map - b.token_map).abs().max() <= 1e-10 * scale, method


def test_maps_equal_a_timm_vit_with_the_same_weights():
    model = tiny(AVG).double()
    text = text_embeddings(model, tokenizer(), [PROMPT.format(c) for c in CLASSES])
    ours, vit = open_clip_vit(model, text), as_timm_vit(model, text)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        assert (vit(x) - own_logits(model, x)).abs().max() < 1e-12  # timm's own forward: the mapping is right
    for method in METHODS:
        a, b = explain(ours, x, method=method), explain(vit, x, method=method)
        scale = b.token_map.abs().max()
        assert (a.token_map - b.token_map).abs().max() <= 1e-10 * scale, method


def test_every_method_runs():
    from transexplain import list_methods

    view = zero_shot_classifier(tiny(AVG), tokenizer(), CLASSES)
    x = torch.randn(2, 3, 16, 16)
    for method in list_methods():
        if method in ("integrated_gradients", "smoothgrad"):
            continue
        try:
            out = explain(view, x, method=method)
        except UserError as err:  # a class-token method on the average-pooled tower: refused in one sentence
            assert "average-pooled" in str(err), method
            continue
        assert torch.isfinite(out.heatmap).all() and out.heatmap.shape == (2, 16, 16), method


def test_unsupported_open_clip_models_are_refused_in_one_sentence():
    from transexplain.models import as_adapter

    pooled = dict(TOK, vision_cfg=dict(TOK["vision_cfg"], attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=2))
    with pytest.raises(UserError, match="pools with attention"):
        zero_shot_classifier(tiny(pooled), tokenizer(), CLASSES)
    none = dict(TOK, vision_cfg=dict(TOK["vision_cfg"], pool_type="none"))
    with pytest.raises(UserError, match="'none'"):
        zero_shot_classifier(tiny(none), tokenizer(), CLASSES)
    from open_clip.model import CLIP

    with pytest.raises(UserError, match="float32 whatever the input"):
        zero_shot_classifier(CLIP(**TOK, cast_dtype=torch.bfloat16).float(), tokenizer(), CLASSES)
    with pytest.raises(UserError, match="not a classifier by itself"):
        as_adapter(tiny(TOK))
    with pytest.raises(UserError, match="at least two classes"):
        zero_shot_classifier(tiny(TOK), tokenizer(), ["cat"])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("open_clip") / "m"
    save_folder(tiny(TOK), TOK, root)
    return root


def test_load_folder_and_arch_with_file(folder, tmp_path):
    loaded = load_model(f"open_clip:{folder}", classes=CLASSES)
    assert loaded.class_names == CLASSES and loaded.input_size == (3, 16, 16) and loaded.weights.startswith("checkpoint:")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    want = own_logits(tiny(TOK), x)
    assert (explain(loaded.model, x, method="rollout").logits - want).abs().max() < 1e-12
    # ARCH:FILE with an architecture open_clip knows by name (a tiny one registered for this test)
    (tmp_path / "tx-tiny-open-clip.json").write_text(json.dumps(TOK))
    open_clip.add_model_config(tmp_path / "tx-tiny-open-clip.json")
    by_name = load_model(f"open_clip:tx-tiny-open-clip:{folder / 'open_clip_model.safetensors'}", classes=CLASSES)
    assert (explain(by_name.model, x, method="rollout").logits - want).abs().max() < 1e-12
    rand = load_model("open_clip:tx-tiny-open-clip", classes=CLASSES, random_weights=True)
    assert rand.weights == "random-init"
    with pytest.raises(UserError, match="names no weights"):
        load_model("open_clip:tx-tiny-open-clip", classes=CLASSES)
    with pytest.raises(UserError, match="No open_clip weights file"):
        load_model("open_clip:tx-tiny-open-clip:laion2b_s34b_b79k", classes=CLASSES)
    with pytest.raises(UserError, match="has no model"):
        load_model("open_clip:no-such-arch:x.bin", classes=CLASSES)
    with pytest.raises(UserError, match="--classes"):
        load_model(f"open_clip:{folder}")
    (tmp_path / "tx-tiny-open-clip-avg.json").write_text(json.dumps(AVG))
    wide = dict(TOK, vision_cfg=dict(TOK["vision_cfg"], width=32))
    (tmp_path / "tx-tiny-open-clip-wide.json").write_text(json.dumps(wide))
    open_clip.add_model_config(tmp_path)
    for other in ("avg", "wide"):  # other keys, other shapes
        with pytest.raises(UserError, match="do not fit"):
            load_model(f"open_clip:tx-tiny-open-clip-{other}:{folder / 'open_clip_model.safetensors'}", classes=CLASSES)


def test_explain_command_on_an_open_clip_model(folder, tmp_path):
    from PIL import Image

    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8")).save(img)
    entry = Path(sys.executable).parent / "tx-bench"
    r = subprocess.run([str(entry), "explain", str(img), "--model", f"open_clip:{folder}", "--classes", ",".join(CLASSES),
                        "--prompt", "a picture of a {}", "--method", "attnlrp", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert any(c in r.stdout for c in CLASSES)
    assert list((tmp_path / "o").glob("*.npy"))
