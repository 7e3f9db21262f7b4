"""TokenTM: equal to an independent NumPy computation of the definition (explicit loops over tokens,
attention gradients by central differences), batch-invariant, class-specific, finite where tokens
have zero length, and running on Swin and BERT; plus one check per open choice that would fail if the
choice were changed; and the one independent re-implementation (transform_TokenTM in
NightMachinery/decompv-libragrad-v1) run on the same weights: equal given its before/after tokens,
and how far its token choice moves the map."""
import ast
import functools
import math
import os
import subprocess
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

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


# -- the one independent re-implementation, run on the same weights ------------------------------
# `transform_TokenTM` of NightMachinery/decompv-libragrad-v1 (decompv/x/ds/utils.py, the LibraGrad
# authors' benchmark; the TokenTM authors published no code). Its module imports their modified timm
# and a dozen other packages, so the function and the five small helpers it calls are taken out of
# the file as written (by name, through `ast`) and run on the tensors their pipeline (`dsmap_attn`,
# plain gradients: gradient brand NG) records for a timm ViT, recorded here by a forward written from
# the model's parameters. Nothing of their aggregation is retyped.
LIBRAGRAD_MIRROR = "/work/.mirror/NightMachinery+decompv-libragrad-v1/repo"
LIBRAGRAD_FILE = "decompv/x/ds/utils.py"
LIBRAGRAD_FUNCTIONS = ("einsum_agg_fn", "model_attn_p", "model_cls_p", "model_cls_attn_p", "skip_if_no_cls_attn",
                       "transform_TokenTM", "get_input_patches")


class _NoEpsilon(ast.NodeTransformer):
    """`epsilon = 1e-8` (their ratio's ‖ẽ‖/(‖e‖ + ε)) -> `epsilon = 0.0`; counts the replacements."""
    found = 0

    def visit_Assign(self, node):
        if [getattr(t, "id", None) for t in node.targets] == ["epsilon"]:
            assert isinstance(node.value, ast.Constant) and node.value.value == 1e-8, ast.dump(node)
            self.found += 1
            node.value = ast.Constant(0.0)
        return node


def _libragrad_tokentm(path, epsilon=True):
    """Their transform_TokenTM from the file at `path` (epsilon=False: with ε = 0 in the ratio)."""
    import einops

    with warnings.catch_warnings():  # their file has regexes in plain strings ("\d"): not ours to report
        warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
        tree = ast.parse(open(path).read(), filename=str(path))
    picked = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in LIBRAGRAD_FUNCTIONS]
    assert sorted(n.name for n in picked) == sorted(LIBRAGRAD_FUNCTIONS), [n.name for n in picked]
    if not epsilon:
        patch = _NoEpsilon()
        picked = [patch.visit(n) if n.name == "transform_TokenTM" else n for n in picked]
        assert patch.found == 1, patch.found
    module = ast.fix_missing_locations(ast.Module(body=picked, type_ignores=[]))
    # the names their module has from its imports (decompv.x.bootstrap: torch.nn.functional as F)
    space = {"torch": torch, "F": torch.nn.functional, "einops": einops, "functools": functools,
             "torch_shape_get": lambda *a, **k: None}
    exec(compile(module, str(path), "exec"), space)
    return space["transform_TokenTM"]


@pytest.fixture(scope="module")
def libragrad(tmp_path_factory):
    """The file holding their transform_TokenTM: $DECOMPV_LIBRAGRAD_DIR (a checkout), else the mirror."""
    pytest.importorskip("einops")
    root = os.environ.get("DECOMPV_LIBRAGRAD_DIR")
    if root:
        return os.path.join(root, LIBRAGRAD_FILE)
    if not os.path.isdir(LIBRAGRAD_MIRROR):
        pytest.skip("the re-implementation (github.com/NightMachinery/decompv-libragrad-v1) is not available here; "
                    "set DECOMPV_LIBRAGRAD_DIR to a checkout")
    path = tmp_path_factory.mktemp("decompv_libragrad") / "utils.py"
    path.write_text(subprocess.run(["git", "--git-dir", LIBRAGRAD_MIRROR, "show", f"HEAD:{LIBRAGRAD_FILE}"],
                                   check=True, capture_output=True, text=True).stdout)
    return path


def libragrad_batch(model, x, target):
    """What their dsmap_attn stores for a timm ViT (no layer scale), from a forward written from the
    parameters: `patches` (patch embedding + class token + position embedding, the tokens entering
    block 0), per block the attention probabilities and their gradient of Σ_b y_{b,t_b} (raw logits,
    plain autograd), the residual stream after the attention sublayer (their blocks' stored_post_attn)
    and the block's output. Also the logits, to check the forward against the model's own."""
    h = model.patch_embed(x)  # timm's own module: (B, N-1, D)
    h = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), h], 1) + model.pos_embed
    batch, blocks, atts = {"patches": h.detach()}, [], []
    for b, blk in enumerate(model.blocks):
        n_batch, n, d = h.shape
        heads = blk.attn.num_heads
        qkv = F.linear(F.layer_norm(h, (d,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps), blk.attn.qkv.weight, blk.attn.qkv.bias)
        q, k, v = qkv.reshape(n_batch, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        atts.append(att)
        h = h + F.linear((att @ v).transpose(1, 2).reshape(n_batch, n, d), blk.attn.proj.weight, blk.attn.proj.bias)
        blocks.append(types.SimpleNamespace(stored_post_attn=h.detach()))
        mlp = F.linear(F.gelu(F.linear(F.layer_norm(h, (d,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps),
                                       blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        h = h + mlp
        batch[f"blocks__{b}__output"] = h.detach()
    pooled = F.layer_norm(h[:, 0], (h.shape[-1],), model.norm.weight, model.norm.bias, model.norm.eps)
    logits = F.linear(pooled, model.head.weight, model.head.bias)
    grads = torch.autograd.grad((logits * F.one_hot(target, logits.shape[-1]).to(logits.dtype)).sum(), atts)
    for b, (a, g) in enumerate(zip(atts, grads)):
        batch[f"blocks__{b}__attn__rawattn"] = a.detach()
        batch[f"blocks__{b}__attn__rawattn_grad"] = g.detach()
    return batch, types.SimpleNamespace(blocks=blocks, has_class_token=True), logits.detach()


def _with_their_tokens(adapter, monkeypatch):
    """Our explainer fed their before/after tokens: attention ẽ = the residual stream after the
    attention sublayer (skip included), MLP ẽ = the block output (skip included); e unchanged."""
    run = adapter.run

    def swapped(x, **kw):
        trace = run(x, **kw)
        if trace.extras.get("sublayers") is None:  # a run that records no tokens (explain's memory probe)
            return trace
        for s, out in zip(trace.extras["sublayers"], trace.extras["hidden"]):
            s["attn_out"], s["mlp_out"] = s["mlp_in"], out.detach()
        return trace

    monkeypatch.setattr(adapter, "run", swapped)


def test_equals_the_libragrad_reimplementation_given_its_tokens(libragrad, monkeypatch):
    """With their token choice (the one documented difference) switched on in ours, ours equals
    their transform_TokenTM's class-token row of C_L (all N columns, class token included): as
    written (ε = 1e-8 in ‖ẽ‖/(‖e‖+ε)) within the bound that ε implies, and with ε = 0 to 1e-12."""
    theirs, theirs_exact = _libragrad_tokentm(libragrad), _libragrad_tokentm(libragrad, epsilon=False)
    depth = 3
    model = make_vit(depth=depth, heads=2, dim=16, classes=5)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    adapter = as_adapter(model)
    _with_their_tokens(adapter, monkeypatch)
    worst, worst_exact = 0.0, 0.0
    for target in (None, [3, 1, 4]):
        ours = transexplain.explain(adapter, x, "tokentm", target=target)
        batch, stub, logits = libragrad_batch(model, x, ours.target)
        torch.testing.assert_close(logits, model(x).detach(), rtol=0, atol=1e-12)
        expected = theirs(dict(batch), stub)["TokenTM"][:, 0, :]  # their readout: attributions_autoget's row 0
        exact = theirs_exact(dict(batch), stub)["TokenTM"][:, 0, :]
        got = ours.extras["scores"]
        assert got.shape == expected.shape and (expected > 0).all()
        # every term of C_L[0, j] is a product of at most 2·depth weights w (one per sublayer), each
        # smaller on their side by the factor ‖e‖/(‖e‖+ε): relative gap <= 2·depth·ε/min‖e‖
        befores = [batch["patches"], *(batch[f"blocks__{b}__output"] for b in range(depth - 1)),
                   *(b.stored_post_attn for b in stub.blocks)]  # their e's
        smallest = min(float(t.norm(dim=-1).min()) for t in befores)
        bound = 2 * depth * 1e-8 / smallest
        gap = float(((got - expected) / expected).abs().max())
        assert ((got - expected) / expected >= -1e-12).all()  # theirs is the smaller: ε only shrinks w
        assert gap <= bound + 1e-12, (gap, bound)
        worst = max(worst, gap)
        worst_exact = max(worst_exact, float(((got - exact) / exact).abs().max()))
    print(f"tokentm (their tokens) vs libragrad transform_TokenTM: max relative difference {worst:.2e} "
          f"(bound from their eps {bound:.1e}); with eps = 0: {worst_exact:.2e}")
    assert worst_exact <= 1e-12, worst_exact


def _blobs(size):
    """Two smooth images (a bright Gaussian blob on a dark ground), normalised to about [-1, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.stack([(2 * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.1) - 1).expand(3, -1, -1)
                        for cx, cy in ((0.3, 0.2), (-0.5, 0.4))]).double()


def test_our_token_choice_differs_from_the_libragrad_reimplementation(libragrad):
    """Measured, not equal by design: ours (ẽ = each sublayer's own output, skip excluded) against
    their transform_TokenTM as written (ẽ = the residual stream after each sublayer, skip included),
    on the tiny random ViT and on the embedded (trained) ViT when it is built. Fails if our tokens
    became theirs."""
    from transexplain.errors import UserError
    from transexplain.models.loading import load_model

    theirs = _libragrad_tokentm(libragrad)
    g = torch.Generator().manual_seed(8)
    cases = [("tiny random ViT", make_vit(depth=3, heads=2, dim=16, classes=5), torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=g))]
    try:
        embedded = load_model("embedded").model.double().eval()
        cases.append(("embedded ViT", embedded, torch.cat([torch.randn(4, 3, 112, 112, dtype=torch.float64, generator=g), _blobs(112)])))
    except UserError:
        pass  # not built: the tiny model alone
    for name, model, x in cases:
        ours = transexplain.explain(model, x, "tokentm")
        batch, stub, logits = libragrad_batch(model, x, ours.target)
        torch.testing.assert_close(logits, model(x).detach(), rtol=0, atol=1e-12)
        expected = theirs(dict(batch), stub)["TokenTM"][:, 0, 1:]  # patch columns, as laid on the grid
        got = ours.extras["scores"][:, 1:]
        # each map scaled to its maximum (the heatmaps are min-max normalised), and rank agreements
        a, b = got / got.amax(1, keepdim=True), expected / expected.amax(1, keepdim=True)
        diff = float((a - b).abs().max())
        rank = lambda t: np.argsort(np.argsort(t.numpy()))  # noqa: E731
        spearman = [float(np.corrcoef(rank(p), rank(q))[0, 1]) for p, q in zip(got, expected)]
        k = max(1, got.shape[1] // 10)
        top = [len(set(p.topk(k).indices.tolist()) & set(q.topk(k).indices.tolist())) / k for p, q in zip(got, expected)]
        print(f"tokentm vs libragrad transform_TokenTM as written, {name} ({x.shape[0]} images): max |difference| of "
              f"max-scaled maps {diff:.2f}; Spearman {min(spearman):.2f}..{max(spearman):.2f}; "
              f"top-{k} overlap {min(top):.2f}..{max(top):.2f}")
        assert diff > 1e-2
