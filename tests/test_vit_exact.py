"""The ViT explainers against an independent NumPy implementation of their definitions (float64)."""
import numpy as np
import pytest
import torch

import transexplain
from brute_force import NumpyViT
from conftest import make_vit


CONFIGS = {
    "1 block, 2 heads, 4 tokens": dict(depth=1, img=(4, 12)),  # CLS + a 1x3 grid
    "2 blocks, 2 heads, 7 tokens": dict(depth=2, img=(8, 12)),  # CLS + a 2x3 grid
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request):
    cfg = CONFIGS[request.param]
    model = make_vit(depth=cfg["depth"], heads=2, dim=8, img=cfg["img"], patch=4, classes=4, seed=3)
    torch.manual_seed(1)
    x = torch.randn(1, 3, *cfg["img"], dtype=torch.float64)
    ref = NumpyViT(model)
    img = x[0].numpy()
    logits = ref.forward(img)
    target = int(np.argmax(logits))
    return model, x, ref, img, target



def explain64(*args, **kwargs):
    """The equality with the reference is checked in precision float64 (every rule in float64)."""
    return transexplain.explain(*args, precision="float64", **kwargs)

def close(ours, expected, rtol=1e-6):
    ours = ours.reshape(-1).numpy()
    expected = np.asarray(expected).reshape(-1)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(ours, expected, rtol=0, atol=rtol * scale)


def test_logits_match_numpy(setup):
    model, x, ref, img, _ = setup
    close(model(x).detach(), ref.forward(img), 1e-10)
    trace = transexplain.as_adapter(model).run(x)
    close(trace.logits.detach(), ref.forward(img), 1e-10)


def test_raw_attention_and_rollout(setup):
    model, x, ref, img, _ = setup
    _, acts = ref.forward(img, keep=True)
    att = [blk["att"].mean(0) for blk in acts["blocks"]]
    close(explain64(model, x, "raw_attention").token_map, att[-1][0, 1:])
    eye = np.eye(att[0].shape[0])
    for start in range(len(att)):
        joint = eye
        for b in range(start, len(att)):
            m = att[b] + eye
            joint = (m / m.sum(-1, keepdims=True)) @ joint
        close(explain64(model, x, "rollout", start_layer=start).token_map, joint[0, 1:])


def test_gradcam_matches_finite_differences(setup):
    model, x, ref, img, target = setup
    _, acts = ref.forward(img, keep=True)
    att = acts["blocks"][-1]["att"]
    grad = ref.attention_grad(img, target, ref.depth - 1)
    alpha = grad[:, 0, 1:].mean(-1)
    expected = np.clip((alpha[:, None] * att[:, 0, 1:]).mean(0), 0, None)
    close(explain64(model, x, "gradcam").token_map, expected, 1e-5)


def test_generic_attention(setup):
    model, x, ref, img, target = setup
    _, acts = ref.forward(img, keep=True)
    n = acts["emb_cat"].shape[0]
    rel = np.eye(n)
    for b in range(ref.depth):
        g = ref.attention_grad(img, target, b)
        a_bar = np.clip(g * acts["blocks"][b]["att"], 0, None).mean(0)
        rel = rel + a_bar @ rel
    close(explain64(model, x, "generic_attention").token_map, rel[0, 1:], 1e-5)


@pytest.mark.parametrize("start", [0, 1])
def test_transformer_attribution(setup, start):
    model, x, ref, img, target = setup
    if start >= ref.depth:
        pytest.skip("start layer beyond the model's depth")
    att_rel, _ = ref.relevance(img, target, "ours")
    n = att_rel[0].shape[-1]
    joint = np.eye(n)
    for b in range(start, ref.depth):
        g = ref.attention_grad(img, target, b)
        joint = (np.clip(g * att_rel[b], 0, None).mean(0) + np.eye(n)) @ joint
    close(explain64(model, x, "transformer_attribution", start_layer=start).token_map, joint[0, 1:], 1e-5)


def test_transformer_attribution_other_target(setup):
    model, x, ref, img, target = setup
    other = (target + 1) % 4
    att_rel, _ = ref.relevance(img, other, "ours")
    n = att_rel[0].shape[-1]
    joint = np.eye(n)
    start = min(1, ref.depth - 1)
    for b in range(start, ref.depth):
        g = ref.attention_grad(img, other, b)
        joint = (np.clip(g * att_rel[b], 0, None).mean(0) + np.eye(n)) @ joint
    res = explain64(model, x, "ours", target=other, start_layer=start)
    assert int(res.target) == other
    close(res.token_map, joint[0, 1:], 1e-5)


def test_partial_lrp(setup):
    model, x, ref, img, target = setup
    att_rel, _ = ref.relevance(img, target, "classic")
    expected = np.clip(att_rel[ref.depth - 1], 0, None).mean(0)[0, 1:]
    close(explain64(model, x, "partial_lrp").token_map, expected)


def test_full_lrp(setup):
    model, x, ref, img, target = setup
    _, pixels = ref.relevance(img, target, "classic", to_pixels=True)
    res = explain64(model, x, "full_lrp")
    assert res.token_map.shape == (1, *img.shape[1:])
    close(res.token_map, pixels)
