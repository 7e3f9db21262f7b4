"""Our metrics against ports of the official scorers, on hand-made examples worked out here.

The ports are written in this file from the official definitions (ERASER's
rationale_benchmark/metrics.py; the reference ImageNet-Segmentation evaluation of Chefer et al.),
not from the package's code: spans and probabilities in, the official number out. Each hand-made
example also has its arithmetic in a comment. The text `full_lrp` and the text rollout default are
checked against an independent NumPy computation of the reference's definitions.
"""
import copy
import math

import numpy as np
import pytest
import torch

from brute_force import gelu, layer_norm, sdiv
from transexplain.evaluation import eraser as E
from transexplain.evaluation.metrics import average_precision as seg_average_precision
from transexplain.evaluation.metrics import intersection_union, mean_iou


# =============================================================================== ERASER ports
def port_partial_match(truth: dict, pred: dict, threshold: float = 0.5) -> dict:
    """ERASER's partial-match (IOU) F1. truth / pred: {document: set of (start, end) spans}.

    A predicted span is a true positive when its best IOU with a gold span of its document is
    >= threshold. micro: P = ΣTP / Σ#pred, R = ΣTP / Σ#gold. macro: P averaged over the documents
    that have predictions, R (= TP / #gold) over the documents that have gold spans; F1 of the two
    means (0 when either is 0).
    """
    def f1(p, r):
        return 0.0 if p == 0 or r == 0 else 2 * p * r / (p + r)

    tps = {}
    for doc in set(truth) | set(pred):
        count = 0
        for ps, pe in pred.get(doc, set()):
            best = 0.0
            for ts, te in truth.get(doc, set()):
                a, b = set(range(ps, pe)), set(range(ts, te))
                best = max(best, len(a & b) / len(a | b) if a | b else 0.0)
            count += best >= threshold
        tps[doc] = count
    n_gold = {d: len(s) for d, s in truth.items() if s}
    n_pred = {d: len(s) for d, s in pred.items() if s}
    micro_p = sum(tps.values()) / sum(n_pred.values()) if n_pred else 0.0
    micro_r = sum(tps.values()) / sum(n_gold.values()) if n_gold else 0.0
    macro_p = float(np.mean([tps[d] / n for d, n in n_pred.items()])) if n_pred else 0.0
    macro_r = float(np.mean([tps[d] / n for d, n in n_gold.items()])) if n_gold else 0.0
    return {"micro": f1(micro_p, micro_r), "macro": f1(macro_p, macro_r), "macro_p": macro_p, "macro_r": macro_r}


def port_soft_scores(truth: list, scores: list) -> dict:
    """ERASER's soft-token scores. `auprc`: per document sklearn precision_recall_curve then
    sklearn auc(recall, precision), averaged over every document; `average_precision`: sklearn
    average_precision_score averaged over the documents that are not all-gold or all-not-gold."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve

    areas, aps = [], []
    for t, s in zip(truth, scores):
        p, r, _ = precision_recall_curve([int(v) for v in t], s)
        areas.append(auc(r, p))
        if any(t) and not all(t):
            aps.append(average_precision_score([int(v) for v in t], s))
    return {"auprc": float(np.mean(areas)), "average_precision": float(np.mean(aps)) if aps else float("nan")}


def port_aopc(instances: list, key: str) -> float:
    """ERASER's AOPC: per instance, for its predicted class c (the argmax of its full-document
    scores), p_full[c] - p_bin[c] for every bin; the mean over instances and bins."""
    deltas = []
    for inst in instances:
        c = int(np.argmax(inst["full"]))
        deltas.append([inst["full"][c] - b[c] for b in inst[key]])
    return float(np.mean(deltas))


def brute_trapezoid_pr(scores, gold) -> float:
    """The area under the PR curve by a loop over the distinct scores, from the top: each
    threshold adds a point (R, P); the curve starts at (0, 1); trapezoids between the points."""
    scores, gold = np.asarray(scores, dtype=float), np.asarray(gold, dtype=bool)
    points = [(0.0, 1.0)]
    for thr in sorted(set(scores.tolist()), reverse=True):
        sel = scores >= thr
        tp = int((sel & gold).sum())
        points.append((tp / gold.sum(), tp / sel.sum()))
    area = 0.0
    for (r0, p0), (r1, p1) in zip(points, points[1:]):
        area += (r1 - r0) * (p0 + p1) / 2
    return area


# ------------------------------------------------------------------------- IOU-F1
def test_iou_f1_official_and_corrected_by_hand():
    truth = {"d1": {(0, 4), (10, 14)}, "d2": {(20, 24)}}
    pred = {"d1": {(1, 4)}, "d2": {(20, 23), (30, 31), (40, 41)}}
    # d1: (1,4) vs (0,4): IOU 3/4, a hit; (10,14) is found by nothing -> hits 1, found 1, 1 pred, 2 gold
    # d2: (20,23) vs (20,24): IOU 3/4, a hit; the two others miss -> hits 1, found 1, 3 pred, 1 gold
    counts = {d: E.iou_match_counts(sorted(pred[d]), sorted(truth[d])) for d in truth}
    assert counts == {"d1": (1, 1), "d2": (1, 1)}
    hits, n_pred, n_gold = [1, 1], [1, 3], [2, 1]
    # official macro: mean P = (1/1 + 1/3)/2 = 2/3, mean R = (1/2 + 1/1)/2 = 3/4,
    # F1 = 2 (2/3)(3/4) / (2/3 + 3/4) = 1 / (17/12) = 12/17
    official = port_partial_match(truth, pred)
    assert official["macro"] == pytest.approx(12 / 17)
    assert E.iou_f1(hits, n_pred, n_gold) == pytest.approx(12 / 17)
    # official micro: P = 2/4, R = 2/3 -> F1 = (2/3) / (7/6) = 4/7
    assert official["micro"] == pytest.approx(4 / 7)
    assert E.iou_f1_micro(hits, n_pred, n_gold) == pytest.approx(4 / 7)
    # corrected: per-document F1: d1 P 1, R 1/2 -> 2/3; d2 P 1/3, R 1 -> 1/2; mean 7/12
    pairs = [E.iou_precision_recall(sorted(pred[d]), sorted(truth[d])) for d in ("d1", "d2")]
    assert pairs == [(1.0, 0.5), (pytest.approx(1 / 3), 1.0)]
    assert E.iou_f1_corrected(pairs) == pytest.approx(7 / 12)


def test_official_iou_recall_counts_predicted_spans_and_can_pass_one():
    # gold (0,10); predicted (0,5) and (5,10): each IOU 5/10 = 0.5 >= 0.5, so two hits for one gold span
    truth, pred = {"d": {(0, 10)}}, {"d": {(0, 5), (5, 10)}}
    assert E.iou_match_counts([(0, 5), (5, 10)], [(0, 10)]) == (2, 1)
    # official: P = 2/2 = 1, R = 2/1 = 2 -> F1 = 2*1*2/3 = 4/3 (above 1)
    assert port_partial_match(truth, pred)["macro_r"] == 2.0
    assert E.iou_f1([2], [2], [1]) == pytest.approx(port_partial_match(truth, pred)["macro"]) == pytest.approx(4 / 3)
    # corrected: R = gold spans found / gold spans = 1 -> F1 1
    assert E.iou_f1_corrected([E.iou_precision_recall([(0, 5), (5, 10)], [(0, 10)])]) == 1.0
    # overlapping gold spans (0,4) and (1,4), one predicted (0,4): IOU 1 and 3/4, one hit, both found
    # official: P 1, R 1/2 -> 2/3; corrected: R 2/2 -> 1
    assert E.iou_f1([1], [1], [2]) == pytest.approx(port_partial_match({"d": {(0, 4), (1, 4)}}, {"d": {(0, 4)}})["macro"])
    assert E.iou_f1([1], [1], [2]) == pytest.approx(2 / 3)
    assert E.iou_f1_corrected([E.iou_precision_recall([(0, 4)], [(0, 4), (1, 4)])]) == 1.0
    # repeated gold spans count once, as in the official sets
    assert E.iou_match_counts([(0, 2)], [(0, 4), (0, 4)]) == (1, 1)


def test_official_macro_iou_averages_over_documents_with_predictions_or_gold():
    # d1 has gold but no prediction, d2 a prediction but no gold, d3 one exact hit
    truth = {"d1": {(0, 2)}, "d3": {(5, 7)}}
    pred = {"d2": {(0, 1)}, "d3": {(5, 7)}}
    # mean P over d2, d3 = (0 + 1)/2 = 1/2; mean R over d1, d3 = (0 + 1)/2 = 1/2 -> F1 1/2
    assert port_partial_match(truth, pred)["macro"] == pytest.approx(0.5)
    assert E.iou_f1(hits=[0, 0, 1], n_pred=[0, 1, 1], n_gold=[1, 0, 1]) == pytest.approx(0.5)


# ------------------------------------------------------------------------- AUPRC and AP
def test_auprc_and_average_precision_against_the_port_by_hand():
    docs = [([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]),
            ([0.2, 0.6, 0.6, 0.1, 0.0], [1, 1, 0, 0, 0]),
            ([0.3, 0.5], [1, 1])]
    # doc 1: auprc 19/24 (test_eraser_metrics), AP 5/6
    # doc 2: thresholds 0.6 -> (R, P) = (1/2, 1/2), 0.2 -> (1, 2/3), 0.1 -> (1, 1/2), 0.0 -> (1, 2/5);
    #   auprc = 1/2 (1 + 1/2)/2 + 1/2 (1/2 + 2/3)/2 = 3/8 + 7/24 = 2/3; AP = 1/2 * 1/2 + 1/2 * 2/3 = 7/12
    # doc 3 (all gold): points (0, 1), (1/2, 1), (1, 1): auprc 1; discarded from the AP mean
    expected_auprc = (19 / 24 + 2 / 3 + 1) / 3
    expected_ap = (5 / 6 + 7 / 12) / 2
    port = port_soft_scores([t for _, t in docs], [s for s, _ in docs])
    assert port["auprc"] == pytest.approx(expected_auprc)
    assert port["average_precision"] == pytest.approx(expected_ap)
    ours_auprc = [E.auprc(s, t) for s, t in docs]
    ours_ap = [E.average_precision(s, t) for s, t in docs]
    assert ours_auprc == pytest.approx([19 / 24, 2 / 3, 1.0])
    assert math.isnan(ours_ap[2])
    assert float(np.nanmean(ours_auprc)) == pytest.approx(expected_auprc)
    assert float(np.nanmean(ours_ap)) == pytest.approx(expected_ap)


def test_auprc_equals_a_brute_force_trapezoid_with_ties():
    rng = np.random.default_rng(5)
    for _ in range(20):
        n = int(rng.integers(3, 30))
        scores = rng.integers(0, 6, n) / 5.0  # many ties
        gold = rng.random(n) < 0.3
        gold[0] = True
        assert E.auprc(scores, gold) == pytest.approx(brute_trapezoid_pr(scores, gold), abs=1e-12)
    # a word cut off by truncation (-inf) scores as 0
    assert E.auprc([0.5, -np.inf, 0.0], [1, 0, 1]) == pytest.approx(brute_trapezoid_pr([0.5, 0.0, 0.0], [1, 0, 1]))


# ------------------------------------------------------------------------- AOPC
def test_bin_sizes_are_a_fraction_of_the_whole_document():
    # int(q n): n = 250 -> int(2.5) = 2, int(12.5) = 12, 25, 50, 125; n = 30 -> 0, int(1.5) = 1, 3, 6, 15
    assert E.bin_sizes(250) == [2, 12, 25, 50, 125]
    assert E.bin_sizes(30) == [0, 1, 3, 6, 15]
    # ours (corrected): max(1, round(q n)) of the words in the window
    assert [E.k_for_fraction(30, q) for q in E.AOPC_FRACTIONS] == [1, 2, 3, 6, 15]


def test_ranking_puts_cut_off_words_last_in_document_order():
    assert E.ranking([0.2, -np.inf, 0.5, 0.2, -np.inf]) == [2, 0, 3, 1, 4]


def test_aopc_port_uses_the_predicted_class_by_hand():
    # two documents, two classes; probabilities of the full document and of the five bins
    inst = [{"full": [0.2, 0.8], "comp": [[0.3, 0.7], [0.4, 0.6], [0.5, 0.5], [0.6, 0.4], [0.7, 0.3]]},
            {"full": [0.6, 0.4], "comp": [[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1], [0.5, 0.5]]}]
    # doc 1 predicts class 1: 0.8 - (0.7, 0.6, 0.5, 0.4, 0.3) = 0.1, 0.2, 0.3, 0.4, 0.5 (mean 0.3)
    # doc 2 predicts class 0: 0.6 - (0.6, 0.7, 0.8, 0.9, 0.5) = 0, -0.1, -0.2, -0.3, 0.1 (mean -0.1)
    assert port_aopc(inst, "comp") == pytest.approx((0.3 - 0.1) / 2)
    # with the true class instead (say class 1 for both), doc 2 would give 0.4 - (0.4, 0.3, 0.2, 0.1, 0.5)
    # = 0, 0.1, 0.2, 0.3, -0.1 (mean 0.1): (0.3 + 0.1)/2 = 0.2, a different number
    rows = {"comp": np.array([[0.1, 0.2, 0.3, 0.4, 0.5], [0.0, -0.1, -0.2, -0.3, 0.1]])}
    assert float(np.mean(rows["comp"])) == pytest.approx(port_aopc(inst, "comp"))


# ------------------------------------------------------------------------- the runner, end to end
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "is", "good", "bad", "plot", "act", "##ing",
         "and", "a", "very", "slow", "story", "fun", "end"]


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    tok = BertTokenizerFast(str(vocab))  # the vocabulary file, positionally (its keyword changed name)
    torch.manual_seed(1)
    # initializer_range 0.2 (10x BERT's): the probabilities move when words go
    cfg = BertConfig(num_labels=2, num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                     vocab_size=len(WORDS), max_position_embeddings=64, initializer_range=0.2)
    model = BertForSequenceClassification(cfg).eval()  # float32: the runner casts it to float64
    return model, tok


def _examples():
    from transexplain.data.eraser import Evidence, Example

    texts = [("the film is good and the acting is very fun the end", 1, [(3, 4), (8, 10)]),
             ("a very slow story and a bad plot the end is bad bad slow slow story", 0, [(0, 4), (6, 8), (11, 12)]),
             ("bad", 0, [(0, 1)])]
    out = []
    for i, (text, label, ev) in enumerate(texts):
        out.append(Example(f"a{i}", f"d{i}", label, text.split(), [Evidence(f"d{i}", s, e) for s, e in ev]))
    return out


def test_runner_follows_the_official_definitions_end_to_end(tiny_text):
    """evaluate_batch against a recomputation from the explanation's token scores: word scores by a
    loop, the official bins int(q · #words) over the whole document, the predicted class of a
    float64 forward of Hugging Face's own model, and the official span and soft-score ports."""
    from transexplain import explain
    from transexplain.models.text import TextAdapter

    model, tok = tiny_text
    examples = _examples()
    max_length = 12  # [CLS] + 10 words + [SEP]: the second document is cut off
    adapter = TextAdapter(model, tok)
    rationale_k = 3
    rows = E.evaluate_batch(adapter, tok, examples, "transformer_attribution", max_length, rationale_k,
                            faithfulness=True, precision="float64")
    enc = tok([e.words for e in examples], is_split_into_words=True, truncation=True, max_length=max_length,
              padding=True, return_tensors="pt", return_special_tokens_mask=True)
    labels = [e.label for e in examples]
    token_map = explain(adapter, adapter.prepare(enc), method="transformer_attribution", target=torch.tensor(labels),
                        precision="float64").token_map
    m64 = copy.deepcopy(model).double().eval()

    def probs(word_lists):
        word_lists = [w if w else ["[UNK]"] for w in word_lists]
        e = tok(word_lists, is_split_into_words=True, truncation=True, max_length=max_length, padding=True,
                return_tensors="pt")
        with torch.no_grad():
            return m64(**e).logits.softmax(-1).numpy()

    truth, pred = {}, {}
    for i, ex in enumerate(examples):
        n = len(ex.words)
        # word scores: the max over a word's pieces of the clamped token scores, special tokens skipped
        ws = [None] * n
        for t, w in enumerate(enc.word_ids(i)):
            if w is not None and not enc["special_tokens_mask"][i, t]:
                v = max(float(token_map[i, t]), 0.0)
                ws[w] = v if ws[w] is None else max(ws[w], v)
        seen = [j for j in range(n) if ws[j] is not None]
        order = sorted(seen, key=lambda j: (-ws[j], j)) + [j for j in range(n) if ws[j] is None]
        assert rows["n_seen"][i] == len(seen) and rows["n_words"][i] == n
        # official AOPC: k = int(q n) words of the whole document, the model's predicted class
        full = probs([ex.words])[0]
        c = int(np.argmax(full))
        comp, suff = [], []
        for q in (0.01, 0.05, 0.10, 0.20, 0.50):
            top = set(order[:int(q * n)])
            removed = probs([[w for j, w in enumerate(ex.words) if j not in top]])[0]
            kept = probs([[w for j, w in enumerate(ex.words) if j in top]])[0]
            comp.append(full[c] - removed[c])
            suff.append(full[c] - kept[c])
        np.testing.assert_allclose(rows["comp"][i], comp, rtol=0, atol=1e-12)
        np.testing.assert_allclose(rows["suff"][i], suff, rtol=0, atol=1e-12)
        assert rows["p_full"][i] == pytest.approx(full[c], abs=1e-12)
        # corrected AOPC: max(1, round(q · #seen)) of the words in the window, the true class
        y = ex.label
        comp_c = []
        for q in (0.01, 0.05, 0.10, 0.20, 0.50):
            top = set(order[:min(len(seen), max(1, round(q * len(seen))))])
            comp_c.append(full[y] - probs([[w for j, w in enumerate(ex.words) if j not in top]])[0][y])
        np.testing.assert_allclose(rows["comp_corrected"][i], comp_c, rtol=0, atol=1e-12)
        # spans for IOU: the top rationale_k seen words as maximal runs
        chosen = sorted(order[:min(rationale_k, len(seen))])
        runs = []
        for j in chosen:
            if runs and runs[-1][1] == j:
                runs[-1][1] = j + 1
            else:
                runs.append([j, j + 1])
        pred[ex.docid] = {tuple(r) for r in runs}
        truth[ex.docid] = {(ev.start_token, ev.end_token) for ev in ex.evidences}
        # soft scores: every word of the document, cut-off words at 0
        gold = [j in ex.evidence_tokens for j in range(n)]
        soft = [0.0 if v is None else v for v in ws]
        if not all(gold):
            assert rows["average_precision"][i] == pytest.approx(port_soft_scores([gold], [soft])["average_precision"])
        assert rows["auprc"][i] == pytest.approx(port_soft_scores([gold], [soft])["auprc"])
    assert rows["n_seen"][1] < rows["n_words"][1]  # the truncated document is exercised
    assert (rows["pred"] != rows["label"]).any() and np.abs(rows["comp"]).max() > 0.01  # and the class choice
    summary = E.summarise(rows)
    assert summary["iou_f1"] == pytest.approx(port_partial_match(truth, pred)["macro"])
    assert summary["iou_f1_micro"] == pytest.approx(port_partial_match(truth, pred)["micro"])
    # a float32 run gives the same rows to float32 accuracy (the precision keyword reaches the forwards)
    rows32 = E.evaluate_batch(adapter, tok, examples, "transformer_attribution", max_length, rationale_k,
                              faithfulness=True, precision="float32")
    np.testing.assert_allclose(rows32["comp"], rows["comp"], atol=1e-4)


# =============================================================================== segmentation
def port_reference_segmentation_ap(relevance, mask) -> float:
    """The reference's per-image AP: min-max normalise the map (0/0 gives NaN), channels
    [1 - map, map] with NaN set to 0, one-hot target, sklearn AP of the pooled channels."""
    from sklearn.metrics import average_precision_score

    r = np.asarray(relevance, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (r - r.min()) / (r.max() - r.min())
    fg, bg = r.copy(), 1 - r
    fg[np.isnan(fg)] = 0
    bg[np.isnan(bg)] = 0
    mask = np.asarray(mask)
    target = np.stack([mask == 0, mask == 1]).astype(int).reshape(-1)
    return float(np.nan_to_num(average_precision_score(target, np.stack([bg, fg]).reshape(-1))))


def test_segmentation_ap_equals_the_reference_port():
    rng = np.random.default_rng(7)
    for _ in range(10):
        m = rng.random((5, 6))
        m = (m - m.min()) / (m.max() - m.min())  # the maps the benchmark scores are min-max normalised
        t = (rng.random((5, 6)) > 0.6).astype(np.uint8)
        assert seg_average_precision(m, t) == pytest.approx(port_reference_segmentation_ap(m, t), abs=1e-12)
    mask = np.array([[1, 0], [0, 0]])
    for value in (0.0, 0.3, 1.0):
        constant = np.full((2, 2), value)
        # every one of the 8 pooled scores is 0 and 4 are positive: AP = 4/8
        assert port_reference_segmentation_ap(constant, mask) == 0.5
        assert seg_average_precision(constant, mask) == 0.5


def test_miou_counts_an_absent_class_as_the_reference_does():
    # one image, all foreground, predicted all foreground: background has an empty union
    pred = np.ones((2, 2), dtype=int)
    inter, union = intersection_union(pred, pred)
    assert union.tolist() == [[0, 4]]
    # reference: IoU_c = inter / (eps + union): background 0, foreground 4/(4 + eps); mean ~ 1/2
    eps = np.spacing(1, dtype=np.float64)
    ref = 100 * float(np.mean(inter.sum(0) / (eps + union.sum(0))))
    assert mean_iou(inter, union) == pytest.approx(ref) == pytest.approx(50.0)
    assert mean_iou(inter, union, absent="skip") == pytest.approx(100.0)  # our variant leaves it out


# =============================================================================== text methods
def _bert(layers=2, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(num_labels=3, num_hidden_layers=layers, hidden_size=16, num_attention_heads=2,
                     intermediate_size=24, vocab_size=50, attn_implementation="eager")
    return BertForSequenceClassification(cfg).eval().double()


def _batch():
    ids = torch.tensor([[2, 7, 9, 11, 13, 3], [2, 5, 6, 3, 0, 0]])
    return ids, (ids != 0).long()


class NumpyBert:
    """BertForSequenceClassification's forward and the classic-rule LRP in NumPy, from the
    definitions: explicit contributions x_j w_ij, no autograd, none of the package's code."""

    def __init__(self, model):
        self.p = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
        self.layers = model.config.num_hidden_layers
        self.heads = model.config.num_attention_heads
        self.eps = model.config.layer_norm_eps

    @staticmethod
    def linear(x, w, r):
        """classic α=1, β=0: separate denominators for the x⁺w⁺ and the x⁻w⁻ parts."""
        contrib = x[:, None, :] * w[None]
        pos = np.where((x[:, None, :] > 0) & (w[None] > 0), contrib, 0.0)
        neg = np.where((x[:, None, :] < 0) & (w[None] < 0), contrib, 0.0)
        return (pos * sdiv(r[:, :, None], pos.sum(-1, keepdims=True))
                + neg * sdiv(r[:, :, None], neg.sum(-1, keepdims=True))).sum(1)

    @staticmethod
    def add(a, b, r):
        s = sdiv(r, a + b)
        return a * s, b * s

    @staticmethod
    def bilinear(a, b, r):
        terms = a[..., :, :, None] * b[..., None, :, :]
        share = terms * sdiv(r, a @ b)[..., :, None, :]
        return share.sum(-1) / 2, share.sum(-3) / 2

    def forward(self, h0, mask):
        p, H = self.p, self.heads
        n, dim = h0.shape
        d = dim // H
        bias = (1.0 - mask[None, None, :]) * np.finfo(np.float64).min
        h, acts = h0, []
        for layer in range(self.layers):
            pre = f"bert.encoder.layer.{layer}."

            def lin(x, name):
                return x @ p[pre + name + ".weight"].T + p[pre + name + ".bias"]

            q, k, v = (lin(h, "attention.self." + w).reshape(n, H, d).transpose(1, 0, 2) for w in ("query", "key", "value"))
            scores = q @ k.transpose(0, 2, 1)
            scaled = scores / math.sqrt(d)
            z = scaled + bias
            e = np.exp(z - z.max(-1, keepdims=True))
            att = e / e.sum(-1, keepdims=True)
            ctx = (att @ v).transpose(1, 0, 2).reshape(n, dim)
            out = lin(ctx, "attention.output.dense")
            h1 = layer_norm(out + h, p[pre + "attention.output.LayerNorm.weight"], p[pre + "attention.output.LayerNorm.bias"], self.eps)
            g = gelu(lin(h1, "intermediate.dense"))
            o = lin(g, "output.dense")
            acts.append(dict(h=h, q=q, k=k, v=v, scaled=scaled, bias=np.broadcast_to(bias, scaled.shape), att=att,
                             ctx=ctx, out=out, h1=h1, g=g, o=o))
            h = layer_norm(o + h1, p[pre + "output.LayerNorm.weight"], p[pre + "output.LayerNorm.bias"], self.eps)
        cls = h[0]
        pooled = np.tanh(cls @ p["bert.pooler.dense.weight"].T + p["bert.pooler.dense.bias"])
        logits = pooled @ p["classifier.weight"].T + p["classifier.bias"]
        return logits, acts, cls, pooled

    def token_relevance(self, h0, mask, target):
        p, H = self.p, self.heads
        logits, acts, cls, pooled = self.forward(h0, mask)
        n, dim = h0.shape
        seed = np.zeros_like(logits)
        seed[target] = 1.0
        r_pooled = self.linear(pooled[None], p["classifier.weight"], seed[None])  # tanh: relevance passes
        r_cls = self.linear(cls[None], p["bert.pooler.dense.weight"], r_pooled)[0]
        r = np.zeros((n, dim))
        r[0] = r_cls
        for layer in reversed(range(self.layers)):
            a, pre = acts[layer], f"bert.encoder.layer.{layer}."
            r_o, r_h1 = self.add(a["o"], a["h1"], r)  # output LayerNorm: relevance passes
            r_g = self.linear(a["g"], p[pre + "output.dense.weight"], r_o)  # GELU: passes
            r_h1 = r_h1 + self.linear(a["h1"], p[pre + "intermediate.dense.weight"], r_g)
            r_out, r_res = self.add(a["out"], a["h"], r_h1)  # attention LayerNorm: passes
            r_ctx = self.linear(a["ctx"], p[pre + "attention.output.dense.weight"], r_out)
            r_att, r_v = self.bilinear(a["att"], a["v"], r_ctx.reshape(n, H, -1).transpose(1, 0, 2))
            r_scaled, _ = self.add(a["scaled"], a["bias"], r_att)  # softmax passes; the mask is an addend
            r_q, r_kt = self.bilinear(a["q"], a["k"].transpose(0, 2, 1), r_scaled)  # the 1/sqrt(d) scale passes
            r_k = r_kt.transpose(0, 2, 1)
            r = r_res
            for name, rr in (("query", r_q), ("key", r_k), ("value", r_v)):
                r = r + self.linear(a["h"], p[pre + "attention.self." + name + ".weight"], rr.transpose(1, 0, 2).reshape(n, dim))
        return logits, r.sum(-1)


def test_text_full_lrp_equals_a_numpy_lrp_to_the_embedding_output():
    from transexplain import explain
    from transexplain.models.text import TextAdapter

    for layers in (1, 2):
        model = _bert(layers, seed=layers)
        adapter = TextAdapter(model)
        ids, mask = _batch()
        targets = torch.tensor([0, 2])
        e = explain(adapter, {"input_ids": ids, "attention_mask": mask}, method="full_lrp", target=targets, precision="float64")
        assert e.token_map.shape == (2, 6) and e.token_map.dtype == torch.float64
        assert e.heatmap.shape == (2, 6)
        ref = NumpyBert(model)
        with torch.no_grad():
            h0 = model.bert.embeddings(input_ids=ids).numpy()
        for i in range(2):
            logits, expected = ref.token_relevance(h0[i], mask[i].double().numpy(), int(targets[i]))
            np.testing.assert_allclose(logits, model(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1]).logits[0].detach().numpy(),
                                       atol=1e-10, rtol=0)
            scale = np.abs(expected).max()
            assert scale > 0
            np.testing.assert_allclose(e.token_map[i].numpy(), expected, rtol=0, atol=1e-8 * scale)
        assert (e.token_map[mask == 0] == 0).all()


def test_text_rollout_starts_at_layer_zero_and_vision_at_one():
    from conftest import make_vit
    from transexplain import explain
    from transexplain.models.text import TextAdapter

    model = _bert(3)
    ids, mask = _batch()
    out = model(input_ids=ids[:1], attention_mask=mask[:1], output_attentions=True)
    eye = np.eye(ids.shape[1])
    joint = eye
    for att in out.attentions:  # every layer, the first included (the reference's BERT rollout)
        m = att[0].mean(0).detach().numpy() + eye
        joint = (m / m.sum(-1, keepdims=True)) @ joint
    got = explain(TextAdapter(model), {"input_ids": ids[:1], "attention_mask": mask[:1]}, method="rollout").token_map
    np.testing.assert_allclose(got[0].numpy(), joint[0], rtol=0, atol=1e-12)
    vit = make_vit(depth=3)
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(explain(vit, x, "rollout").token_map, explain(vit, x, "rollout", start_layer=1).token_map)
    assert not torch.allclose(explain(vit, x, "rollout").token_map, explain(vit, x, "rollout", start_layer=0).token_map)
