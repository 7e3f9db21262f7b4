"""TokenTM: equal to an independent NumPy computation of the definition (explicit loops over tokens,
attention gradients by central differences), batch-invariant, class-specific, finite where tokens
have zero length, and running on Swin and BERT; plus one check per open choice that would fail if the
choice were changed."""
import math

import numpy as np
import torch

import transexplain
from transexplain.explainers.tokentm import transformation_weights
from transexplain.models import as_adapter

from brute_force import NumpyViT, layer_norm
from conftest import make_vit


# -- the definition, written independently of the package ----------------------------------------
def _weights(before, after):
    """w_j = ‖ẽ_j‖/‖e_j‖ · exp(cos_j) / Σ_k exp(cos_k), token by token (no zero-length token here)."""
    n = before.shape[0]
    ratio, cos = [], []
    for j in range(n):
        le = math.sqrt(sum(float(c) ** 2 for c in before[j]))
        lf = math.sqrt(sum(float(c) ** 2 for c in after[j]))
        ratio.append(lf / le)
        cos.append(sum(float(a) * float(b) for a, b in zip(before[j], after[j])) / (le * lf))
    total = sum(math.exp(c) for c in cos)
    return [ratio[j] * math.exp(cos[j]) / total for j in range(n)]


def brute_force_tokentm(model, img, target):
    """The class token's row of C_L = Π_l (I + W_mlp)(I + (Ā W_att) ⊙ E_h ReLU(∇A)) · diag‖e⁰‖."""
    nv = NumpyViT(model)
    p = nv.p
    _, acts = nv.forward(img, keep=True)
    x0 = acts["blocks"][0]["x_in"]
    n = x0.shape[0]
    c = np.diag([math.sqrt(float((x0[j] ** 2).sum())) for j in range(n)])
    dim = x0.shape[1]
    for b in range(nv.depth):
        a, pre = acts["blocks"][b], f"blocks.{b}."
        grad = nv.attention_grad(img, target, b)  # (H, N, N), central differences
        g = np.maximum(grad, 0).mean(0)
        att = a["att"].mean(0)
        # each token through the attention sublayer alone: LayerNorm, value projection, output projection
        w_v, b_v = p[pre + "attn.qkv.weight"][2 * dim:], p[pre + "attn.qkv.bias"][2 * dim:]
        alone = []
        for j in range(n):
            h = layer_norm(a["x_in"][j], p[pre + "norm1.weight"], p[pre + "norm1.bias"], nv.eps)
            alone.append(p[pre + "attn.proj.weight"] @ (w_v @ h + b_v) + p[pre + "attn.proj.bias"])
        w_att = _weights(a["x_in"], np.stack(alone))
        u_att = np.eye(n)
        for i in range(n):
            for j in range(n):
                u_att[i, j] += att[i, j] * w_att[j] * g[i, j]
        w_mlp = _weights(a["x_mid"], a["f2"])
        u_mlp = np.eye(n) + np.diag(w_mlp)
        c = u_mlp @ u_att @ c
    return c[0, 1:]


def test_equals_the_definition_computed_independently():
    model = make_vit(depth=3, heads=2, dim=16, classes=5)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    worst = 0.0
    for target in (None, [3, 1]):
        ours = transexplain.explain(model, x, "tokentm", target=target)
        for i in range(x.shape[0]):
            expected = torch.from_numpy(brute_force_tokentm(model, x[i].numpy(), int(ours.target[i]))).reshape(4, 4)
            scale = expected.abs().max()
            assert scale > 0
            err = float((ours.token_map[i] - expected).abs().max() / scale)
            worst = max(worst, err)
    print("max relative |ours - brute force|:", worst)
    # central differences (step 1e-6) of a smooth function: ~1e-10 relative
    assert worst <= 1e-6, worst


# -- the contract ---------------------------------------------------------------------------------
def test_batch_invariant_and_class_specific(vit64):
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    whole = transexplain.explain(vit64, x, "tokentm", target=2)
    for i in range(4):
        alone = transexplain.explain(vit64, x[i:i + 1], "tokentm", target=2)
        assert (alone.token_map[0] - whole.token_map[i]).abs().max() <= 1e-12 * whole.token_map[i].abs().max()
    other = transexplain.explain(vit64, x, "tokentm", target=4)
    assert (other.token_map - whole.token_map).abs().amax((1, 2)).min() > 1e-3 * whole.token_map.abs().max()
    predicted = transexplain.explain(vit64, x, "tokentm")
    same = transexplain.explain(vit64, x, "tokentm", target=predicted.target)
    assert torch.equal(predicted.token_map, same.token_map)
    # every factor is >= 0 (attention, ReLU'd gradient, lengths, softmax), so the map is too
    assert (whole.token_map >= 0).all()


def test_finite_on_black_and_constant_images_in_both_precisions_and_on_swin():
    from transexplain.models.loading import load_model
    from transexplain.precision import adapter_at

    for spec in ("embedded", "embedded-swin"):
        model = load_model(spec).model
        adapter = adapter_at(model, "float64")
        c, h, w = adapter.input_size
        mean, std = torch.tensor(adapter.mean).view(3, 1, 1), torch.tensor(adapter.std).view(3, 1, 1)
        black = ((torch.zeros(c, h, w) - mean) / std).expand(2, c, h, w)
        grey = ((torch.full((c, h, w), 0.5) - mean) / std).expand(2, c, h, w)
        noise = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(5))
        for precision in ("float64", "float32"):
            for x in (black, grey, noise):
                r = transexplain.explain(model, x, "tokentm", precision=precision)
                assert r.token_map.isfinite().all() and r.heatmap.isfinite().all()
                assert (r.token_map >= 0).all()
        assert (r.token_map.abs().amax((1, 2)) > 0).all()


def test_zero_length_tokens_follow_the_stated_convention():
    # the 0/0 cases: ratio 0 where ‖e‖ = 0, cosine 0 where either length is 0, padding excluded
    e = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [1.0, 0.0], [2.0, 2.0]]], dtype=torch.float64)
    f = torch.tensor([[[1.0, 1.0], [0.0, 0.0], [0.0, 2.0], [9.0, 9.0]]], dtype=torch.float64)
    valid = torch.tensor([[True, True, True, False]])
    w = transformation_weights(e, f, valid)
    # cosines: 0 (e zero), 0 (ẽ zero), 0 (orthogonal); token 3 is padding: the softmax is 1/3 each
    expected = torch.tensor([[0.0 * (1 / 3), 0.0 * (1 / 3), 2.0 * (1 / 3), 0.0]], dtype=torch.float64)
    assert torch.allclose(w, expected, rtol=0, atol=1e-15)
    # a model whose first tokens are exactly zero (no bias, no position or class embedding, black input)
    model = make_vit(depth=2)
    with torch.no_grad():
        model.patch_embed.proj.bias.zero_()
        model.pos_embed.zero_()
        model.cls_token.zero_()
    r = transexplain.explain(model, torch.zeros(2, 3, 16, 16, dtype=torch.float64), "tokentm", target=1)
    assert r.token_map.isfinite().all() and (r.token_map == 0).all()  # C_0 = 0: nothing has length


def test_runs_on_swin_batch_invariant_on_its_first_stage_grid():
    from test_swin import make_swin

    model = make_swin()
    x = torch.randn(3, 3, 56, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    whole = transexplain.explain(model, x, "tokentm", target=1)
    assert whole.token_map.shape == (3, 14, 14)
    assert whole.token_map.isfinite().all() and (whole.token_map >= 0).all()
    alone = transexplain.explain(model, x[1:2], "tokentm", target=1)
    assert (alone.token_map[0] - whole.token_map[1]).abs().max() <= 1e-12 * whole.token_map[1].abs().max()
    other = transexplain.explain(model, x, "tokentm", target=3)
    assert (other.token_map - whole.token_map).abs().max() > 1e-3 * whole.token_map.abs().max()


def _tiny_bert():
    from test_text_adapter import tiny_bert

    return tiny_bert()


def test_runs_on_bert_and_padding_changes_nothing():
    from test_text_adapter import padded_batch

    model = _tiny_bert()
    adapter = as_adapter(model)
    ids, mask = padded_batch()
    batch = adapter.prepare({"input_ids": ids, "attention_mask": mask})
    out = transexplain.explain(adapter, batch, "tokentm")
    assert out.token_map.shape == ids.shape and out.token_map.isfinite().all()
    assert (out.token_map[mask == 0] == 0).all() and (out.token_map >= 0).all()
    # NECC normalises over the valid tokens only: each sample's scores equal those of the same
    # sample run alone without its padding (would fail if padding entered the softmax)
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        trimmed = adapter.prepare({"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n]})
        alone = transexplain.explain(adapter, trimmed, "tokentm", target=out.target[i:i + 1])
        scale = alone.token_map.abs().max()
        assert (alone.token_map[0] - out.token_map[i, :n]).abs().max() <= 1e-10 * scale
    # class-specific on the tokens other than [CLS] (whose own row entry holds the skip path, I·‖e⁰‖)
    other = transexplain.explain(adapter, batch, "tokentm", target=(out.target + 1) % 3)
    rest, other_rest = out.token_map[:, 1:], other.token_map[:, 1:]
    assert (other_rest - rest).abs().max() > 1e-3 * rest.abs().max()


# -- the open choices -----------------------------------------------------------------------------
def test_attention_tokens_recompose_the_sublayer_output():
    """ẽ_j is the attention sublayer's output for a query that attends to j alone: with one head the
    sublayer's output is exactly A·ẽ (fails if ẽ lacked the projection, the biases or the layer
    scale, or were the residual stream after the sublayer); e is the residual stream, and the MLP's
    tokens add up to the block's output (fails if e were the LayerNorm output)."""
    model = make_vit(depth=2, heads=1, init_values=0.7)  # with layer scale
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    adapter = as_adapter(model)
    trace = adapter.run(x, sublayers=True)
    for b, s in enumerate(trace.extras["sublayers"]):
        att = trace.attentions[b][:, 0].detach()
        assert torch.allclose(s["mlp_in"] - s["attn_in"], att @ s["attn_out"], rtol=0, atol=1e-12)
        assert torch.allclose(s["mlp_in"] + s["mlp_out"], trace.extras["hidden"][b].detach(), rtol=0, atol=1e-12)
        before = s["attn_in"] if b == 0 else trace.extras["hidden"][b - 1].detach()
        assert torch.equal(s["attn_in"], before)


def test_bert_sublayer_tokens_are_the_pre_layernorm_sublayer_outputs():
    """BERT (post-norm): with one head, LN(e + A·ẽ) is the MLP's input and LN(e' + ẽ') the layer's output."""
    from test_text_adapter import TINY, padded_batch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=3, **{**TINY, "num_attention_heads": 1})).eval().double()
    adapter = as_adapter(model)
    ids, mask = padded_batch()
    trace = adapter.run(adapter.prepare({"input_ids": ids, "attention_mask": mask}), sublayers=True)
    for b, layer in enumerate(model.bert.encoder.layer):
        s = trace.extras["sublayers"][b]
        att = trace.attentions[b][:, 0].detach()
        ln_a, ln_o = layer.attention.output.LayerNorm, layer.output.LayerNorm
        torch.testing.assert_close(ln_a(s["attn_in"] + att @ s["attn_out"]), s["mlp_in"], rtol=0, atol=1e-12)
        torch.testing.assert_close(ln_o(s["mlp_in"] + s["mlp_out"]), trace.extras["hidden"][b].detach(), rtol=0, atol=1e-12)
