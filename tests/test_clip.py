"""CLIP image towers as zero-shot classifiers: the classes come from text prompts, the explained
score is CLIP's own image-text logit."""
import json
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from transexplain import explain
from transexplain.errors import UserError
from transexplain.models.canonizers import zero_shot_classifier
from transexplain.models.loading import load_model

from conftest import rollout_reference

CLASSES = ["cat", "dog", "car"]


def tiny_clip_folder(root: Path) -> Path:
    """A random-weight CLIPModel and a character-level CLIP tokenizer, saved as a local folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    root.mkdir(parents=True, exist_ok=True)
    toks = ["<|startoftext|>", "<|endoftext|>"] + list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(toks)}))
    (root / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt")).save_pretrained(root)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(toks), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32),
        projection_dim=8)
    model = CLIPModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" not in name:
                p.copy_((1 + 0.1 * torch.randn_like(p)) if "norm" in name and name.endswith("weight") else 0.5 * torch.randn_like(p))
    model.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip_folder(tmp_path_factory.mktemp("clip") / "m")


def reference(clip_dir, x, prompt="a photo of a {}"):
    """CLIP's own logits_per_image for the prompts, from transformers alone."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).double().eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    batch = tok([prompt.format(c) for c in CLASSES], padding=True, return_tensors="pt")
    return model, batch


def test_logits_are_clips_image_text_logits(clip_dir):
    loaded = load_model(f"clip:{clip_dir}", classes=CLASSES)
    assert loaded.class_names == CLASSES and loaded.input_size == (3, 32, 32)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model, batch = reference(clip_dir, x)
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=x).logits_per_image
        got = explain(loaded.model, x, method="rollout").logits
    assert (got - want).abs().max().item() < 1e-10


def test_saliency_and_rollout_equal_computations_on_the_clip_model(clip_dir):
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model, batch = reference(clip_dir, x)
    view = zero_shot_classifier(model, __import__("transformers").AutoTokenizer.from_pretrained(clip_dir), CLASSES)
    # the attention probabilities from the tower's own q and k projections, captured by hooks: not
    # transformers' eager attention, whose softmax runs in float32 (2.8e-7 off in the logits)
    qk = []
    hooks = [lin.register_forward_hook(lambda mod, inp, out: qk.append(out.detach()))
             for layer in model.vision_model.encoder.layers for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj)]
    xg = x.clone().requires_grad_(True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=xg).logits_per_image
    for h in hooks:
        h.remove()
    t = logits.argmax(-1)
    (g,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), xg)
    assert torch.allclose(explain(view, x, method="saliency").token_map, g.abs().amax(1), atol=1e-12, rtol=1e-9)
    heads = model.config.vision_config.num_attention_heads
    atts = []
    for q, k in zip(qk[0::2], qk[1::2]):
        q, k = (t.reshape(2, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k))
        atts.append(torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1))
    joint = rollout_reference(atts[1:])  # the vision default starts at block 1
    assert torch.allclose(explain(view, x, method="rollout").token_map, joint[:, 0, 1:].reshape(2, 4, 4), atol=1e-12)


def test_every_method_runs_on_the_zero_shot_classifier(clip_dir):
    from transexplain import list_methods

    view = load_model(f"clip:{clip_dir}", classes=CLASSES).model
    x = torch.randn(2, 3, 32, 32)
    for method in list_methods():
        if method in ("integrated_gradients", "smoothgrad"):
            continue
        out = explain(view, x, method=method)
        assert torch.isfinite(out.heatmap).all() and out.heatmap.shape == (2, 32, 32), method


def test_bad_clip_inputs_are_one_sentence(clip_dir):
    with pytest.raises(UserError, match="--classes"):
        load_model(f"clip:{clip_dir}")
    with pytest.raises(UserError, match="at least two classes"):
        load_model(f"clip:{clip_dir}", classes=["cat"])
    with pytest.raises(UserError, match="no \\{\\}"):
        load_model(f"clip:{clip_dir}", classes=CLASSES, prompt="a photo")
    with pytest.raises(UserError, match="CLIP models only"):
        load_model("embedded", classes=CLASSES)
    from transformers import CLIPModel

    from transexplain.models import as_adapter

    with pytest.raises(UserError, match="zero_shot_classifier"):
        as_adapter(CLIPModel.from_pretrained(clip_dir))


def test_explain_command_on_a_clip_model(clip_dir, tmp_path):
    from PIL import Image

    img = tmp_path / "img.png"
    Image.fromarray((np.random.default_rng(0).random((40, 40, 3)) * 255).astype("uint8")).save(img)
    entry = Path(sys.executable).parent / "tx-bench"
    r = subprocess.run([str(entry), "explain", str(img), "--model", f"clip:{clip_dir}", "--classes", ",".join(CLASSES),
                        "--prompt", "a picture of a {}", "--method", "rollout", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert any(c in r.stdout for c in CLASSES)
    assert list((tmp_path / "o").glob("*.npy"))


def test_perturbation_benchmark_on_a_clip_model(clip_dir, tmp_path):
    """The embedded shapes' class folders as CLIP's zero-shot classes: the benchmark runs like on
    any classifier, and the classes are part of the run's settings."""
    from transexplain.results import ResultStore

    entry = Path(sys.executable).parent / "tx-bench"
    names = "arrow,circle,crescent,cross,diamond,hexagon,ring,square,star,triangle"
    out = tmp_path / "p.h5"
    r = subprocess.run([str(entry), "perturb", "--model", f"clip:{clip_dir}", "--classes", names, "--method", "rollout",
                        "--limit", "4", "--batch-size", "2", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    store = ResultStore(out)
    assert store.is_complete and store.config["zero_shot_classes"] == names.split(",")
    assert "a photo of a {}" in store.config["model_source"]
    bad = subprocess.run([str(entry), "perturb", "--model", "embedded", "--classes", names, "--method", "rollout",
                          "--limit", "4", "--out", str(tmp_path / "q.h5")], capture_output=True, text=True,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert bad.returncode == 2 and "CLIP models only" in bad.stderr and not (tmp_path / "q.h5").exists()
