"""Beyond Intuition (bt_h, bt_t): equal to the definition computed by explicit loops over blocks,
heads and tokens on independently written forwards (a hand-written ViT; Hugging Face's own BERT),
equal to the public code (jiaminchen-1031/transformerinterp) run on the same weights, and the
explainer contract (batches, targets, black and constant images, text padding, Swin refused)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import transexplain
from transexplain.errors import UserError

from conftest import make_vit

STEPS = 5


# -- the definition, written from the paper's formulas ---------------------------------------------
def _ln(mod, t):
    return F.layer_norm(t, mod.normalized_shape, mod.weight, mod.bias, mod.eps)


def vit_forward(model, x):
    """A timm ViT written from its parameters: logits, each block's attention (B, H, N, N) on the
    graph, the tokens entering each block and each block's value vectors (B, N, H·d)."""
    conv = model.patch_embed.proj
    h = F.conv2d(x, conv.weight, conv.bias, stride=conv.stride).flatten(2).transpose(1, 2)
    h = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), h], 1) + model.pos_embed
    atts, inputs, values = [], [], []
    for blk in model.blocks:
        heads = blk.attn.num_heads
        n_batch, n, d = h.shape
        inputs.append(h)
        qkv = F.linear(_ln(blk.norm1, h), blk.attn.qkv.weight, blk.attn.qkv.bias)
        q, k, v = qkv.reshape(n_batch, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = ((q * (d // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        atts.append(att)
        values.append(v.transpose(1, 2).reshape(n_batch, n, d))
        out = (att @ v).transpose(1, 2).reshape(n_batch, n, d)
        h = h + F.linear(out, blk.attn.proj.weight, blk.attn.proj.bias)
        h = h + F.linear(F.gelu(F.linear(_ln(blk.norm2, h), blk.mlp.fc1.weight, blk.mlp.fc1.bias)),
                         blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    logits = F.linear(_ln(model.norm, h[:, 0]), model.head.weight, model.head.bias)
    return logits, atts, inputs, values


def vit_parts(model, x, alpha, target):
    logits, atts, inputs, values = vit_forward(model, alpha * x)
    grads = torch.autograd.grad(logits[0, target], atts)
    w_o = [blk.attn.proj.weight for blk in model.blocks]
    return [a.detach()[0] for a in atts], [g[0] for g in grads], [z.detach()[0] for z in inputs], \
        [v.detach()[0] for v in values], w_o


def bert_parts(model, ids, alpha, target):
    """The same quantities from Hugging Face's own BertForSequenceClassification (eager attention),
    one unpadded text; the embedding output scaled by alpha as the public BERT code does."""
    handle = model.bert.embeddings.register_forward_hook(lambda m, a, out: out * alpha)
    try:
        out = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
    finally:
        handle.remove()
    grads = torch.autograd.grad(out.logits[0, target], out.attentions)
    layers = model.bert.encoder.layer
    inputs = [out.hidden_states[b].detach()[0] for b in range(len(layers))]
    values = [layers[b].attention.self.value(inputs[b]).detach() for b in range(len(layers))]
    w_o = [layer.attention.output.dense.weight for layer in layers]
    return [a.detach()[0] for a in out.attentions], [g[0] for g in grads], inputs, values, w_o


def brute_force(parts, target, tokenwise, start, steps=STEPS):
    """score_j = W[0, j] · R[0, j] by explicit loops, for one sample; `parts(alpha, target)` gives
    (attentions, ∂y/∂attentions, block inputs, value vectors, W_O) at input alpha·x."""
    atts, grads, inputs, values, w_o = parts(1.0, target)
    n_blocks, heads, n = len(atts), atts[0].shape[0], atts[0].shape[-1]
    if start < 0:
        start += n_blocks
    eye = torch.eye(n, dtype=atts[0].dtype)
    R = eye.clone()
    for b in range(start, n_blocks):
        A, G = atts[b], grads[b]
        mixed = torch.zeros(n, n, dtype=A.dtype)
        if tokenwise:
            m = [float(torch.linalg.vector_norm(w_o[b].detach() @ values[b][j]) / torch.linalg.vector_norm(inputs[b][j])) for j in range(n)]
            for i in range(n):
                for j in range(n):
                    mixed[i, j] = sum(float(A[h, i, j]) for h in range(heads)) / heads * m[j]
        else:
            imp = []
            for h in range(heads):
                total = 0.0
                for j in range(n):
                    for k in range(n):
                        total += abs(float(sum(A[h, i, j] * G[h, i, k] for i in range(n))))
                imp.append(total / n ** 2)
            for h in range(heads):
                mixed += imp[h] / sum(imp) * A[h]
        R = R + mixed @ R
    total = torch.zeros(heads, n, n, dtype=atts[0].dtype)
    for alpha in [i / (steps - 1) for i in range(steps)]:
        total += parts(alpha, target)[1][-1]
    W = (total / steps).clamp(min=0).mean(0)
    return torch.stack([W[0, j] * R[0, j] for j in range(n)])


@pytest.mark.parametrize("method", ["bt_h", "bt_t"])
def test_vit_equals_the_definition_by_explicit_loops(method):
    model = make_vit(depth=3, heads=2, dim=16, classes=5)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    worst = 0.0
    for target, start in ((None, 0), ([3, 1], 1), ([2, 2], -1)):
        ours = transexplain.explain(model, x, method, target=target, start_layer=start, steps=STEPS)
        for i in range(2):
            expected = brute_force(lambda a, t: vit_parts(model, x[i:i + 1], a, t), int(ours.target[i]),
                                   method == "bt_t", start)
            scale = expected.abs().max()
            assert scale > 0
            diff = (ours.extras["scores"][i] - expected).abs().max() / scale
            worst = max(worst, float(diff))
    assert worst <= 1e-6, worst
    print(f"{method} vs explicit loops (ViT): max relative difference {worst:.2e}")


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(num_labels=3, num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                     vocab_size=100, attn_implementation="eager")
    return BertForSequenceClassification(cfg).eval().double()


@pytest.mark.parametrize("method", ["bt_h", "bt_t"])
def test_bert_padded_batch_equals_the_definition_on_each_unpadded_text(method):
    from test_text_adapter import padded_batch
    from transexplain.models.text import TextAdapter

    model = _tiny_bert()
    adapter = TextAdapter(model)
    ids, mask = padded_batch()
    target = torch.tensor([0, 1, 2])
    e = transexplain.explain(adapter, {"input_ids": ids, "attention_mask": mask}, method, target=target, steps=STEPS)
    assert e.token_map.isfinite().all() and (e.token_map[mask == 0] == 0).all()
    worst = 0.0
    for i in range(3):
        n = int(mask[i].sum())
        expected = brute_force(lambda a, t: bert_parts(model, ids[i:i + 1, :n], a, t), int(target[i]), method == "bt_t", 0)
        diff = (e.token_map[i, :n] - expected).abs().max() / expected.abs().max()
        worst = max(worst, float(diff))
    assert worst <= 1e-6, worst
    other = transexplain.explain(adapter, {"input_ids": ids, "attention_mask": mask}, method, target=torch.tensor([2, 0, 1]),
                                 steps=STEPS)
    assert (other.token_map - e.token_map).abs().max() > 1e-6 * e.token_map.abs().max()
    print(f"{method} vs explicit loops (HF BERT, padded batch): max relative difference {worst:.2e}")


# -- the public code, on its own ViT loaded with the same weights ---------------------------------
PUBLIC_MIRROR = "/work/.mirror/jiaminchen-1031+transformerinterp/repo"


def _public_vit_dir(tmp_path_factory):
    """A checkout of the public code's ViT folder: $TRANSFORMERINTERP_DIR, else the local mirror."""
    path = os.environ.get("TRANSFORMERINTERP_DIR")
    if path:
        return os.path.join(path, "ViT")
    if not os.path.isdir(PUBLIC_MIRROR):
        pytest.skip("the public code (github.com/jiaminchen-1031/transformerinterp) is not available here; "
                    "set TRANSFORMERINTERP_DIR to a checkout")
    out = tmp_path_factory.mktemp("transformerinterp")
    archive = subprocess.run(["git", "--git-dir", PUBLIC_MIRROR, "archive", "HEAD", "ViT/baselines"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return str(out / "ViT")


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    pytest.importorskip("einops")
    root = _public_vit_dir(tmp_path_factory)
    sys.path[:0] = [root, os.path.join(root, "baselines", "ViT")]
    try:
        from baselines.ViT.ViT_new import VisionTransformer
        import ViT_explanation_generator as generator
    finally:
        del sys.path[:2]
    return VisionTransformer, generator


@pytest.mark.parametrize("method,theirs,start", [("bt_h", "generate_ours", 0), ("bt_h", "generate_ours", 2),
                                                 ("bt_t", "generate_ours_c", 0), ("bt_t", "generate_ours_c", 1)])
def test_equals_the_public_code_on_the_same_weights(public, monkeypatch, method, theirs, start):
    VisionTransformer, generator = public
    model = make_vit(depth=3, heads=2, dim=16, classes=5)
    ref = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=3, num_heads=2, num_classes=5, qkv_bias=True)
    ref.load_state_dict(model.state_dict())
    for mod in ref.modules():
        if isinstance(mod, torch.nn.LayerNorm):
            mod.eps = 1e-6  # timm's ViT norms; the public ViT leaves LayerNorm's default 1e-5
    ref = ref.double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ref(x), model(x), rtol=0, atol=1e-12)
    ours = transexplain.explain(model, x, method, target=[1, 4], start_layer=start, steps=20)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # CPU only here
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # its eye/zeros buffers; its one-hot float32 promotes
    try:
        explain = getattr(generator.Baselines(ref), theirs)
        # its blocks nb >= start_layer - 1 are ours >= start; it is batch-1 (heads normalised over B·H)
        expected = torch.cat([explain(x[i:i + 1], index=t, steps=20, start_layer=start + 1) for i, t in enumerate([1, 4])]).detach()
    finally:
        torch.set_default_dtype(default)
    got = ours.token_map.reshape(2, -1)
    diff = float((got - expected).abs().max() / expected.abs().max())
    assert diff <= 1e-10, diff
    print(f"{method} vs public {theirs} (start {start}): max relative difference {diff:.2e}")


def _forget_public_bert():
    """Both public repositories name their package BERT_explainability: import each afresh."""
    for name in [m for m in sys.modules if m.split(".")[0] in ("BERT_explainability", "BERT_rationale_benchmark")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def public_bert(tmp_path_factory):
    """The public code's BERT (with its `alpha` that scales the embedding output) and Generator.
    Shims, none in the computation: gensim (imported for word vectors, unused) is stubbed; its
    classifier's missing import of SequenceClassifierOutput is supplied; two helpers transformers 5
    no longer gives its custom BertModel are supplied in the test (see there)."""
    import types

    from transformers.modeling_outputs import SequenceClassifierOutput

    path = os.environ.get("TRANSFORMERINTERP_DIR")
    if path:
        root = os.path.join(path, "BERT")
    else:
        if not os.path.isdir(PUBLIC_MIRROR):
            pytest.skip("the public code (github.com/jiaminchen-1031/transformerinterp) is not available here; "
                        "set TRANSFORMERINTERP_DIR to a checkout")
        out = tmp_path_factory.mktemp("transformerinterp_bert")
        archive = subprocess.run(["git", "--git-dir", PUBLIC_MIRROR, "archive", "HEAD", "BERT/BERT_explainability",
                                  "BERT/BERT_rationale_benchmark"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
        root = str(out / "BERT")
    if "gensim" not in sys.modules:
        gensim, models = types.ModuleType("gensim"), types.ModuleType("gensim.models")
        models.KeyedVectors, gensim.models = None, models
        sys.modules.update({"gensim": gensim, "gensim.models": models})
    _forget_public_bert()
    sys.path.insert(0, root)
    try:
        from BERT_explainability.modules.BERT import BERT as their_bert
        from BERT_explainability.modules.BERT import BertForSequenceClassification as their_cls
        from BERT_explainability.modules.BERT.ExplanationGenerator import Generator
    finally:
        sys.path.remove(root)
        _forget_public_bert()
    their_cls.SequenceClassifierOutput = SequenceClassifierOutput
    return their_bert, their_cls.BertForSequenceClassification, Generator


@pytest.mark.parametrize("method,theirs,start", [("bt_h", "generate_ours", -1), ("bt_t", "generate_ours_c", -4)])
def test_bert_equals_the_public_code_on_the_same_weights(public_bert, monkeypatch, method, theirs, start):
    """Its BERT versions hard-code the blocks (head-wise: the last; token-wise: the last four) and
    zero the [CLS] score; a 5-layer BERT so that -4 is not every layer."""
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedModel
    from transexplain.models.text import TextAdapter

    their_bert, Theirs, Generator = public_bert
    torch.manual_seed(0)
    cfg = BertConfig(num_labels=3, num_hidden_layers=5, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                     vocab_size=100, attn_implementation="eager")
    model = BertForSequenceClassification(cfg).eval().double()
    monkeypatch.setattr(PreTrainedModel, "init_weights", lambda self: None, raising=False)  # overwritten below
    monkeypatch.setattr(their_bert.BertModel, "get_extended_attention_mask",  # no padding: all zeros
                        lambda self, m, shape, device=None: (1.0 - m[:, None, None, :].double()) * -10000.0, raising=False)
    monkeypatch.setattr(their_bert.BertModel, "get_head_mask", lambda self, head_mask, n: [None] * n, raising=False)
    ref = Theirs(cfg).eval().double()
    ref.load_state_dict(model.state_dict(), strict=False)  # its position_ids buffer is its own
    # a GPU copy is a fresh tensor (its `R += ...` writes into an expanded eye)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self.clone(memory_format=torch.contiguous_format))
    adapter = TextAdapter(model)
    g = torch.Generator().manual_seed(7)
    worst = 0.0
    for n, target in ((7, 1), (9, 2)):
        ids = torch.randint(5, 100, (1, n), generator=g)
        ids[0, 0] = 2
        ones = torch.ones_like(ids)
        torch.testing.assert_close(ref(input_ids=ids, attention_mask=ones)[0], model(input_ids=ids).logits, rtol=0, atol=1e-12)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            expected = getattr(Generator(ref), theirs)(ids, ones, index=target, steps=20).detach()[0]
        finally:
            torch.set_default_dtype(default)
        ours = transexplain.explain(adapter, {"input_ids": ids, "attention_mask": ones}, method, target=target,
                                    start_layer=start, steps=20).token_map[0]
        ours = torch.cat([torch.zeros(1, dtype=ours.dtype), ours[1:]])  # its display choice: R[0, 0] = 0
        worst = max(worst, float((ours - expected).abs().max() / expected.abs().max()))
    assert worst <= 1e-10, worst
    print(f"{method} vs public BERT {theirs} (start {start}): max relative difference {worst:.2e}")


# -- the explainer contract -----------------------------------------------------------------------
@pytest.mark.parametrize("method", ["bt_h", "bt_t"])
def test_batch_invariant_and_class_specific(vit64, method):
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    whole = transexplain.explain(vit64, x, method, target=2, steps=STEPS)
    for i in range(4):
        alone = transexplain.explain(vit64, x[i:i + 1], method, target=2, steps=STEPS)
        assert (alone.token_map[0] - whole.token_map[i]).abs().max() <= 1e-12 * whole.token_map[i].abs().max()
    other = transexplain.explain(vit64, x, method, target=4, steps=STEPS)
    assert (other.token_map - whole.token_map).abs().amax((1, 2)).min() > 1e-3 * whole.token_map.abs().max()
    assert (whole.token_map >= 0).all()  # W ≥ 0 (ReLU) and R ≥ 0 (products of nonnegative matrices)


@pytest.mark.parametrize("method", ["bt_h", "bt_t"])
def test_finite_on_black_and_constant_images_in_both_precisions(method):
    from transexplain.models.loading import load_model
    from transexplain.precision import adapter_at

    model = load_model("embedded").model
    adapter = adapter_at(model, "float64")
    c, h, w = adapter.input_size
    mean, std = torch.tensor(adapter.mean).view(3, 1, 1), torch.tensor(adapter.std).view(3, 1, 1)
    black = ((torch.zeros(c, h, w) - mean) / std).expand(2, c, h, w)
    for precision in ("float64", "float32"):
        for x in (black, torch.zeros(2, c, h, w), torch.full((2, c, h, w), 0.7)):
            r = transexplain.explain(model, x, method, precision=precision, steps=STEPS)
            assert r.token_map.isfinite().all() and r.heatmap.isfinite().all()


@pytest.mark.parametrize("method", ["bt_h", "bt_t"])
def test_refused_on_swin_in_one_sentence(method):
    from test_swin import make_swin

    with pytest.raises(UserError, match=rf"(?i)'{method}' is not defined on swin") as err:
        transexplain.explain(make_swin(), torch.zeros(1, 3, 56, 56, dtype=torch.float64), method)
    assert str(err.value).count(". ") == 0 and "class token" in str(err.value)


def test_bad_options_are_one_sentence(vit64):
    x = torch.zeros(1, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(UserError, match="start_layer"):
        transexplain.explain(vit64, x, "bt_h", start_layer=5)
    with pytest.raises(UserError, match="steps"):
        transexplain.explain(vit64, x, "bt_t", steps=1)
