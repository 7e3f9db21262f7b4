"""AttCAT: equal to the definition computed by explicit loops over layers, heads and tokens on
independently written forwards (a hand-written ViT; Hugging Face's own BERT; timm's own Swin read
through hooks), equal to the public code (qiangyao1988/AttCAT) run on the same BERT weights, and
the explainer contract (batches, targets, black and constant images, text padding)."""
import os
import subprocess
import sys
import types

import pytest
import torch

import transexplain

from conftest import make_vit
from test_beyond_intuition import _forget_public_bert, vit_forward


def attcat_by_loops(atts, inputs, grads):
    """Σ_l ᾱ^l_i · Σ_d h^l_{i,d} ∂y/∂h^l_{i,d} for one sample; atts[l] (H, N, N), inputs/grads (N, D)."""
    heads, n = atts[0].shape[0], atts[0].shape[-1]
    out = torch.zeros(n, dtype=atts[0].dtype)
    for layer in range(len(atts)):
        for i in range(n):
            alpha = sum(float(atts[layer][h, q, i]) for h in range(heads) for q in range(n)) / (heads * n)
            cat = sum(float(inputs[layer][i, d] * grads[layer][i, d]) for d in range(inputs[layer].shape[-1]))
            out[i] += alpha * cat
    return out


def test_vit_equals_the_definition_by_explicit_loops():
    model = make_vit(depth=3, heads=2, dim=16, classes=5)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    worst = 0.0
    for target in (None, [3, 1]):
        ours = transexplain.explain(model, x, "attcat", target=target)
        for i in range(2):
            logits, atts, inputs, _ = vit_forward(model, x[i:i + 1])
            grads = torch.autograd.grad(logits[0, int(ours.target[i])], inputs)
            expected = attcat_by_loops([a.detach()[0] for a in atts], [h.detach()[0] for h in inputs], [g[0] for g in grads])
            diff = (ours.extras["scores"][i] - expected).abs().max() / expected.abs().max()
            worst = max(worst, float(diff))
    assert worst <= 1e-6, worst
    print(f"attcat vs explicit loops (ViT): max relative difference {worst:.2e}")


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(num_labels=3, num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                     vocab_size=100, attn_implementation="eager")
    return BertForSequenceClassification(cfg).eval().double()


def hf_attcat(model, ids, target):
    """From Hugging Face's own outputs, as the public code reads them: hidden_states[l] (entry 0 the
    embedding output) paired with the attention of layer l."""
    out = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
    n_layers = len(model.bert.encoder.layer)
    inputs = out.hidden_states[:n_layers]
    grads = torch.autograd.grad(out.logits[0, target], inputs)
    return attcat_by_loops([a.detach()[0] for a in out.attentions], [h.detach()[0] for h in inputs], [g[0] for g in grads])


def test_bert_padded_batch_equals_the_definition_on_each_unpadded_text():
    from test_text_adapter import padded_batch
    from transexplain.models.text import TextAdapter

    model = _tiny_bert()
    adapter = TextAdapter(model)
    ids, mask = padded_batch()
    target = torch.tensor([0, 1, 2])
    e = transexplain.explain(adapter, {"input_ids": ids, "attention_mask": mask}, "attcat", target=target)
    assert e.token_map.isfinite().all() and (e.token_map[mask == 0] == 0).all()
    worst = 0.0
    for i in range(3):
        n = int(mask[i].sum())
        expected = hf_attcat(model, ids[i:i + 1, :n], int(target[i]))
        worst = max(worst, float((e.token_map[i, :n] - expected).abs().max() / expected.abs().max()))
    assert worst <= 1e-6, worst
    other = transexplain.explain(adapter, {"input_ids": ids, "attention_mask": mask}, "attcat", target=torch.tensor([2, 0, 1]))
    assert (other.token_map - e.token_map).abs().max() > 1e-6 * e.token_map.abs().max()
    print(f"attcat vs explicit loops (HF BERT, padded batch): max relative difference {worst:.2e}")


def test_swin_equals_the_definition_read_off_timms_own_forward():
    """timm's Swin with hooks (block inputs, softmax outputs); windows put back on the grid and
    merged tokens split onto their four children by explicit loops."""
    from test_swin import make_swin

    model = make_swin()
    x = torch.randn(2, 3, 56, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ours = transexplain.explain(model, x, "attcat", target=[1, 3])
    blocks = [blk for stage in model.layers for blk in stage.blocks]
    worst = 0.0
    for i in range(2):
        inputs, atts, hooks = [], [], []
        for blk in blocks:
            blk.attn.fused_attn = False
            hooks.append(blk.register_forward_pre_hook(lambda m, args: inputs.append(args[0])))
            hooks.append(blk.attn.softmax.register_forward_hook(lambda m, args, out: atts.append(out)))
        try:
            logits = model(x[i:i + 1])
        finally:
            for h in hooks:
                h.remove()
        grads = torch.autograd.grad(logits[0, int(ours.target[i])], inputs)
        fine = torch.zeros(14, 14, dtype=torch.float64)
        for blk, h, g, a in zip(blocks, inputs, grads, atts):
            _, gh, gw, _ = h.shape
            win, shift = blk.window_size[0], blk.shift_size[0]
            a = a.detach()  # (windows, heads, n, n)
            score = torch.zeros(gh, gw, dtype=torch.float64)
            for w in range(a.shape[0]):
                wr, wc = divmod(w, gw // win)
                for p in range(win * win):
                    pr, pc = divmod(p, win)
                    r, c = (wr * win + pr + shift) % gh, (wc * win + pc + shift) % gw
                    alpha = float(a[w, :, :, p].mean())
                    score[r, c] = alpha * float((h[0, r, c].detach() * g[0, r, c]).sum())
            factor = 14 // gh
            for r in range(14):
                for c in range(14):
                    fine[r, c] += score[r // factor, c // factor] / factor ** 2
        worst = max(worst, float((ours.token_map[i] - fine).abs().max() / fine.abs().max()))
    assert worst <= 1e-6, worst
    print(f"attcat vs explicit loops (timm Swin): max relative difference {worst:.2e}")


# -- the public code, on its own BERT loaded with the same weights ---------------------------------
PUBLIC_MIRROR = "/work/.mirror/qiangyao1988+AttCAT/repo"


@pytest.fixture(scope="module")
def public(tmp_path_factory):
    """The public code's BERT and Generator: $ATTCAT_DIR, else the local mirror. Three shims, none in
    the computation: gensim (imported for word vectors, unused here) is stubbed, and two helpers that
    transformers 5 no longer gives its custom BertModel (init_weights, whose weights are overwritten
    by load_state_dict; the extended attention mask, with no padding all zeros) are supplied."""
    root = os.environ.get("ATTCAT_DIR")
    if not root:
        if not os.path.isdir(PUBLIC_MIRROR):
            pytest.skip("the public code (github.com/qiangyao1988/AttCAT) is not available here; set ATTCAT_DIR to a checkout")
        root = str(tmp_path_factory.mktemp("attcat"))
        archive = subprocess.run(["git", "--git-dir", PUBLIC_MIRROR, "archive", "HEAD", "BERT_explainability",
                                  "BERT_rationale_benchmark"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
    if "gensim" not in sys.modules:
        gensim, models = types.ModuleType("gensim"), types.ModuleType("gensim.models")
        models.KeyedVectors, gensim.models = None, models
        sys.modules.update({"gensim": gensim, "gensim.models": models})
    _forget_public_bert()
    sys.path.insert(0, root)
    try:
        from BERT_explainability.modules.BERT import BERT as their_bert
        from BERT_explainability.modules.BERT.BertForSequenceClassification import BertForSequenceClassification
        from BERT_explainability.modules.BERT.ExplanationGenerator import Generator
    finally:
        sys.path.remove(root)
        _forget_public_bert()
    return their_bert, BertForSequenceClassification, Generator


def test_equals_the_public_code_on_the_same_weights(public, monkeypatch):
    from transformers import PreTrainedModel
    from transexplain.models.text import TextAdapter

    their_bert, Theirs, Generator = public
    model = _tiny_bert()
    monkeypatch.setattr(PreTrainedModel, "init_weights", lambda self: None, raising=False)
    monkeypatch.setattr(their_bert.BertModel, "get_extended_attention_mask",
                        lambda self, m, shape, device=None: (1.0 - m[:, None, None, :].double()) * -10000.0, raising=False)
    monkeypatch.setattr(their_bert.BertModel, "get_head_mask", lambda self, head_mask, n: [None] * n, raising=False)
    ref = Theirs(model.config).eval().double()
    ref.load_state_dict(model.state_dict(), strict=False)  # its position_ids buffer is its own
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # CPU only here
    g = torch.Generator().manual_seed(7)
    adapter = TextAdapter(model)
    worst = 0.0
    for n, target in ((7, 1), (9, 2), (5, 0)):
        ids = torch.randint(5, 100, (1, n), generator=g)
        ids[0, 0] = 2
        ones = torch.ones_like(ids)
        torch.testing.assert_close(ref(input_ids=ids, attention_mask=ones)[0], model(input_ids=ids).logits, rtol=0, atol=1e-12)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)  # its float32 one-hot promotes; its relprop buffers
        try:
            expected = Generator(ref).generate_TransCAM(ids, ones, index=target).detach()
        finally:
            torch.set_default_dtype(default)
        ours = transexplain.explain(adapter, {"input_ids": ids, "attention_mask": ones}, "attcat", target=target)
        worst = max(worst, float((ours.token_map[0] - expected).abs().max() / expected.abs().max()))
    assert worst <= 1e-10, worst
    print(f"attcat vs public generate_TransCAM: max relative difference {worst:.2e}")


# -- the explainer contract -----------------------------------------------------------------------
def test_batch_invariant_and_class_specific(vit64):
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    whole = transexplain.explain(vit64, x, "attcat", target=2)
    for i in range(4):
        alone = transexplain.explain(vit64, x[i:i + 1], "attcat", target=2)
        assert (alone.token_map[0] - whole.token_map[i]).abs().max() <= 1e-12 * whole.token_map[i].abs().max()
    other = transexplain.explain(vit64, x, "attcat", target=4)
    assert (other.token_map - whole.token_map).abs().amax((1, 2)).min() > 1e-3 * whole.token_map.abs().max()


def test_finite_on_black_and_constant_images_in_both_precisions_and_on_swin():
    from transexplain.models.loading import load_model
    from transexplain.precision import adapter_at

    for spec in ("embedded", "embedded-swin"):
        model = load_model(spec).model
        adapter = adapter_at(model, "float64")
        c, h, w = adapter.input_size
        mean, std = torch.tensor(adapter.mean).view(3, 1, 1), torch.tensor(adapter.std).view(3, 1, 1)
        black = ((torch.zeros(c, h, w) - mean) / std).expand(2, c, h, w)
        for precision in ("float64", "float32"):
            for x in (black, torch.zeros(2, c, h, w), torch.full((2, c, h, w), 0.7)):
                r = transexplain.explain(model, x, "attcat", precision=precision)
                assert r.token_map.isfinite().all() and r.heatmap.isfinite().all()
