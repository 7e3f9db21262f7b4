"""TextAdapter: the recorded forward equals Hugging Face's, and every method behaves on text."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,  # noqa: E402
                          DistilBertForSequenceClassification, ElectraConfig, ElectraForSequenceClassification,
                          RobertaConfig, RobertaForSequenceClassification)

from transexplain import explain  # noqa: E402
from transexplain.errors import UserError  # noqa: E402
from transexplain.lrp import OURS, propagate  # noqa: E402
from transexplain.models import as_adapter  # noqa: E402
from transexplain.models.text import TextAdapter, TextBatch, build_minilm_classifier  # noqa: E402

from conftest import rollout_reference  # noqa: E402

TINY = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=100)
METHODS = ["raw_attention", "rollout", "gradcam", "partial_lrp", "full_lrp", "transformer_attribution", "generic_attention",
           "random"]
CLASS_SPECIFIC = ["gradcam", "partial_lrp", "full_lrp", "transformer_attribution", "generic_attention"]


def tiny_bert(num_labels=3, dtype=torch.float64):
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(num_labels=num_labels, **TINY)).eval().to(dtype)


def padded_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (3, 9), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    return ids * mask, mask


@pytest.mark.parametrize("family", ["bert", "roberta", "electra"])
def test_recorded_logits_equal_hf(family):
    torch.manual_seed(0)
    if family == "bert":
        model = BertForSequenceClassification(BertConfig(**TINY))
    elif family == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(**TINY))
    else:
        model = ElectraForSequenceClassification(ElectraConfig(embedding_size=16, **TINY))
    model = model.eval().double()
    ids, mask = padded_batch()
    adapter = as_adapter(model)
    assert isinstance(adapter, TextAdapter)
    trace = adapter.run(adapter.prepare({"input_ids": ids, "attention_mask": mask}), record=True)
    ref = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(trace.logits, ref, atol=1e-12, rtol=0)
    assert len(trace.attentions) == 2 and trace.attentions[0].shape == (3, 4, 9, 9)


def test_minilm_logits_equal_hf():
    model, tok = build_minilm_classifier()
    adapter = TextAdapter(model, tok)
    x = adapter.prepare(["a wonderful film", "the acting is wooden and the plot drags on forever ."])
    ref = model(input_ids=x.input_ids, attention_mask=x.attention_mask, token_type_ids=x.token_type_ids).logits
    torch.testing.assert_close(adapter.run(x).logits, ref, atol=1e-5, rtol=1e-5)
    assert adapter.num_blocks == 6 and adapter.num_heads == 12 and adapter.default_start_layer == 5


@pytest.mark.parametrize("method", METHODS)
def test_method_on_text_padding_batch_invariance_determinism(method):
    model = tiny_bert()
    adapter = TextAdapter(model)
    ids, mask = padded_batch()
    target = torch.tensor([0, 1, 2])
    e = explain(adapter, {"input_ids": ids, "attention_mask": mask}, method=method, target=target)
    assert e.token_map.shape == (3, 9) and e.token_map.dtype == torch.float64
    assert torch.isfinite(e.token_map).all() and torch.isfinite(e.heatmap).all()
    assert (e.token_map[mask == 0] == 0).all() and (e.heatmap[mask == 0] == 0).all()
    assert e.heatmap.min() >= 0 and e.heatmap.max() <= 1
    for i in range(3):
        n = int(mask[i].sum())
        one = explain(adapter, {"input_ids": ids[i:i + 1, :n], "attention_mask": mask[i:i + 1, :n]}, method=method,
                      target=target[i:i + 1])
        torch.testing.assert_close(e.token_map[i, :n], one.token_map[0], atol=1e-5, rtol=0)
    again = explain(adapter, {"input_ids": ids, "attention_mask": mask}, method=method, target=target)
    assert torch.equal(e.token_map, again.token_map)


@pytest.mark.parametrize("method", CLASS_SPECIFIC)
def test_class_specific(method):
    adapter = TextAdapter(tiny_bert())
    ids, mask = padded_batch()
    batch = {"input_ids": ids[:1], "attention_mask": mask[:1]}
    a = explain(adapter, batch, method=method, target=torch.tensor([0])).token_map
    b = explain(adapter, batch, method=method, target=torch.tensor([2])).token_map
    assert (a - b).abs().max() > 1e-12


def test_ours_rules_conserve_relevance_through_blocks():
    adapter = TextAdapter(tiny_bert())
    ids, mask = padded_batch()
    trace = adapter.run(adapter.prepare({"input_ids": ids, "attention_mask": mask}), record=True)
    seed = torch.nn.functional.one_hot(torch.tensor([0, 1, 2]), 3).double()
    checked = {"linear": 0, "add": 0, "matmul": 0}

    def on_node(node, r_out, r_ins):
        if node.kind not in checked:
            return
        total_in = sum(r.sum(dim=tuple(range(1, r.dim()))) for r in r_ins if r is not None)
        total_out = r_out.sum(dim=tuple(range(1, r_out.dim())))
        torch.testing.assert_close(total_in, total_out, atol=1e-8, rtol=1e-6)
        checked[node.kind] += 1

    result = propagate(trace.tape, trace.logits, seed, OURS, on_node=on_node, input_tensor=trace.input)
    # every block: 6 linear (q, k, v, proj, two MLP), 3 add (mask, two residuals), 2 matmul; head: 2 linear
    assert checked == {"linear": 2 * 6 + 2, "add": 2 * 3, "matmul": 2 * 2}
    per_sample = result.input_relevance.sum((1, 2))
    torch.testing.assert_close(per_sample, torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0)
    assert (result.input_relevance[mask == 0] == 0).all()  # padding never gets relevance


def test_refusals_and_inputs():
    adapter = TextAdapter(tiny_bert())
    # full_lrp is defined for text (relevance at the embedding output, summed over hidden units)
    assert explain(adapter, {"input_ids": torch.tensor([[2, 7, 9]])}, method="full_lrp").token_map.shape == (1, 3)
    with pytest.raises(UserError, match="no tokenizer"):
        adapter.prepare(["some text"])
    with pytest.raises(UserError, match="input_ids"):
        adapter.prepare(torch.zeros(2, 3))
    with pytest.raises(UserError, match="out of range"):
        explain(adapter, {"input_ids": torch.tensor([[2, 7, 9]])}, method="gradcam", target=5)
    torch.manual_seed(0)
    batch = adapter.prepare({"input_ids": torch.tensor([[2, 7, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])})
    assert isinstance(batch, TextBatch) and batch.requires_grad_(False) is batch
    assert [t.tolist() for t in batch] == [[2, 7, 9]]


def test_float32_and_float64_agree_for_attention_methods():
    m64 = tiny_bert(dtype=torch.float64)
    m32 = tiny_bert(dtype=torch.float32)
    ids, mask = padded_batch()
    for method in ("rollout", "gradcam", "generic_attention", "transformer_attribution"):
        a = explain(TextAdapter(m64), {"input_ids": ids, "attention_mask": mask}, method=method, target=torch.tensor([0, 1, 2]))
        b = explain(TextAdapter(m32), {"input_ids": ids, "attention_mask": mask}, method=method, target=torch.tensor([0, 1, 2]),
                    precision="float32")
        torch.testing.assert_close(a.token_map.float(), b.token_map, atol=1e-4, rtol=1e-3)


def test_distilbert_records_its_own_logits_and_runs_every_method():
    """DistilBERT through BERT-named views of its own modules: the recorded logits equal its forward,
    and rollout equals rollout of the attention probabilities transformers returns."""
    torch.manual_seed(0)
    model = DistilBertForSequenceClassification(DistilBertConfig(n_layers=2, dim=32, n_heads=4, hidden_dim=64,
                                                                 vocab_size=100, num_labels=3)).double().eval()
    model.config._attn_implementation = "eager"
    ids, mask = padded_batch()
    adapter = as_adapter(model)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        got = adapter.run(adapter.prepare({"input_ids": ids, "attention_mask": mask})).logits
    assert (got - ref.logits).abs().max().item() < 1e-12
    joint = rollout_reference(ref.attentions)  # BERT's rollout multiplies every layer (start 0)
    roll = explain(adapter, {"input_ids": ids, "attention_mask": mask}, method="rollout").token_map
    assert torch.allclose(roll, joint[:, 0] * mask, atol=1e-12)
    for method in METHODS:
        out = explain(adapter, {"input_ids": ids, "attention_mask": mask}, method=method)
        assert torch.isfinite(out.heatmap).all(), method


@pytest.mark.parametrize("method", ["rollout", "transformer_attribution", "attnlrp", "integrated_gradients", "bt_h", "random"])
def test_a_text_batch_over_the_memory_budget_is_explained_in_calls_with_the_same_maps(method, monkeypatch):
    """Text batches split like images (`api.explain` in calls of 2 rows here): the padded length is
    kept, every sample's word ids go with it, and the token maps equal one call's."""
    from transexplain.explainers import get_method, memory

    model = tiny_bert()
    ids, mask = padded_batch()
    ids, mask = torch.cat([ids, ids.flip(0)[:2]]), torch.cat([mask, mask.flip(0)[:2]])  # 5 texts, 3 lengths
    batch = {"input_ids": ids, "attention_mask": mask}
    whole = explain(model, batch, method=method, target=1)
    monkeypatch.setattr(memory, "rows_within_budget", lambda per_row, device: 2)
    cls = get_method(method)
    scores = cls.scores
    widths = []
    monkeypatch.setattr(cls, "scores", lambda self, adapter, x, target: widths.append(x.shape) or scores(self, adapter, x, target))
    split = explain(model, batch, method=method, target=1)
    assert widths == [(2, 9), (2, 9), (1, 9)]
    scale = whole.token_map.abs().max().item()
    torch.testing.assert_close(split.token_map, whole.token_map, rtol=1e-10, atol=1e-10 * scale)
    assert split.target.tolist() == [1] * 5


def test_a_text_batch_slices_and_repeats_with_its_word_ids():
    batch = TextBatch(torch.arange(12).reshape(3, 4), torch.ones(3, 4, dtype=torch.long), None,
                      torch.zeros(3, 4, dtype=torch.long), [[0, 1, 2, None], [0, 0, 1, None], [0, 1, 1, 2]])
    part = batch[1:3]
    assert part.input_ids.tolist() == [[4, 5, 6, 7], [8, 9, 10, 11]] and part.token_type_ids is None
    assert part.word_ids == [[0, 0, 1, None], [0, 1, 1, 2]] and part.special_mask.shape == (2, 4)
    twice = batch[:1].repeat(2)
    assert twice.input_ids.tolist() == [[0, 1, 2, 3]] * 2 and twice.word_ids == [[0, 1, 2, None]] * 2
