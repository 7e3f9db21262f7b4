"""ERASER metrics on tiny hand-worked documents."""
import math

import numpy as np
import pytest

from transexplain.evaluation import eraser as E


def test_word_scores_clamp_skip_special_and_max_over_pieces():
    # tokens: [CLS] the movie ##s was great [SEP] [PAD]
    tokens = [0.9, -0.5, 0.2, 0.7, -0.1, 0.4, 0.8, 0.0]
    word_ids = [None, 0, 1, 1, 2, 3, None, None]
    special = [1, 0, 0, 0, 0, 0, 1, 1]
    ws = E.word_scores(tokens, word_ids, special, 5)  # word 4 was cut off by truncation
    assert ws[:4].tolist() == [0.0, 0.7, 0.0, 0.4]  # clamp at 0; max(0.2, 0.7) for "movie ##s"
    assert ws[4] == -np.inf
    assert E.top_k_words(ws, 2) == {1, 3}
    assert E.top_k_words(ws, 10) == {0, 1, 2, 3}  # a cut-off word is never chosen
    assert E.top_k_words([0.5, 0.5, 0.5], 2) == {0, 1}  # ties broken by position


def test_precision_recall_f1_by_hand():
    # pred {1,2,3,4}, gold {3,4,5}: tp = 2, P = 2/4, R = 2/3, F1 = 2*(1/2)(2/3)/(1/2+2/3) = 4/7
    p, r, f1 = E.precision_recall_f1({1, 2, 3, 4}, {3, 4, 5})
    assert (p, r) == (0.5, pytest.approx(2 / 3))
    assert f1 == pytest.approx(4 / 7)
    assert E.precision_recall_f1(set(), {1}) == (0.0, 0.0, 0.0)
    assert E.precision_recall_f1({1}, set()) == (0.0, 0.0, 0.0)


def test_token_f1_macro_and_micro_by_hand():
    preds = [{0, 1}, {5, 6, 7, 8}]
    golds = [{1}, {5, 6}]
    # doc 1: P = 1/2, R = 1, F1 = 2/3; doc 2: P = 2/4, R = 1, F1 = 2/3 -> macro 2/3
    # pooled: tp = 3, |pred| = 6, |gold| = 3: P = 1/2, R = 1, F1 = 2/3
    out = E.token_f1(preds, golds)
    assert out["instance_macro"] == pytest.approx(2 / 3)
    assert out["instance_micro"] == pytest.approx(2 / 3)
    # macro and micro differ when documents differ in size
    preds = [{0}, {10, 11, 12, 13, 14, 15, 16, 17}]
    golds = [{0}, {10}]
    # doc 1: F1 = 1; doc 2: P = 1/8, R = 1, F1 = 2/9; macro = 11/18
    # pooled: tp = 2, pred 9, gold 2: P = 2/9, R = 1, F1 = (4/9)/(11/9) = 4/11
    out = E.token_f1(preds, golds)
    assert out["instance_macro"] == pytest.approx(11 / 18)
    assert out["instance_micro"] == pytest.approx(4 / 11)


def test_spans_and_iou_f1_by_hand():
    assert E.spans({3, 1, 2, 7, 9, 8}) == [(1, 4), (7, 10)]
    assert E.iou((0, 4), (2, 6)) == pytest.approx(2 / 6)
    assert E.iou((0, 2), (5, 6)) == 0.0
    # gold spans (0,4) and (10,12); predicted (1,4) [IOU 3/4, hit] and (20,21) [miss]
    p, r = E.iou_precision_recall([(1, 4), (20, 21)], [(0, 4), (10, 12)])
    assert (p, r) == (0.5, 0.5)
    # the predicted span (0,2) overlaps (0,4) with IOU 1/2: exactly at the threshold counts
    assert E.iou_precision_recall([(0, 2)], [(0, 4)]) == (1.0, 1.0)
    assert E.iou_precision_recall([(0, 1)], [(0, 4)]) == (0.0, 0.0)
    # our corrected IOU-F1 is the mean of the per-document F1 (the official one: test_official_scorers.py)
    assert E.iou_f1_corrected([(0.5, 0.5), (1.0, 1.0), (0.0, 0.0)]) == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_average_precision_and_auprc_by_hand():
    # (what this project called AUPRC until the official names were followed: it is the official
    # `average_precision`; the official `auprc` is the trapezoid area, test_official_scorers.py)
    # ranking: 0.9 (gold), 0.8 (not), 0.7 (gold), 0.1 (not): AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    assert E.average_precision([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(5 / 6)
    assert E.average_precision([0.1, 0.9], [0, 1]) == pytest.approx(1.0)
    assert math.isnan(E.average_precision([0.1, 0.2], [0, 0]))
    assert math.isnan(E.average_precision([0.1, 0.2], [1, 1]))  # single-class documents are discarded
    assert E.average_precision([-np.inf, 1.0], [0, 1]) == pytest.approx(1.0)
    # the same ranking's PR points (R, P): (0, 1) start, (1/2, 1), (1/2, 1/2), (1, 2/3), (1, 1/2);
    # trapezoids: 1/2 * (1 + 1)/2 + 0 + 1/2 * (1/2 + 2/3)/2 + 0 = 1/2 + 7/24 = 19/24
    assert E.auprc([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(19 / 24)
    assert E.auprc([0.1, 0.9], [0, 1]) == pytest.approx(1.0)
    assert math.isnan(E.auprc([0.1, 0.2], [0, 0]))


def test_aopc_and_fraction_counts():
    assert [E.k_for_fraction(100, q) for q in E.AOPC_FRACTIONS] == [1, 5, 10, 20, 50]
    assert [E.k_for_fraction(30, q) for q in E.AOPC_FRACTIONS] == [1, 2, 3, 6, 15]
    assert E.k_for_fraction(1, 0.5) == 1
    # comprehensiveness: p(y|x) = 0.9 and after removing the top words 0.5, 0.4, 0.3, 0.2, 0.1
    assert E.aopc(0.9, [0.5, 0.4, 0.3, 0.2, 0.1]) == pytest.approx(0.6)
    assert E.aopc(0.9, []) == 0.0


def test_summarise_pools_counts():
    rows = {
        "label": np.array([1, 0]), "pred": np.array([1, 1]),
        "tp": np.array([[1] * 16, [2] * 16]), "n_pred": np.array([[5] * 16, [5] * 16]), "n_gold": np.array([2, 4]),
        "f1": np.array([[0.5] * 16, [0.25] * 16]), "auprc": np.array([0.5, np.nan]),
        "average_precision": np.array([np.nan, 0.25]),
        "iou_hits": np.array([1, 0]), "iou_n_pred": np.array([1, 2]), "iou_n_gold": np.array([1, 1]),
        "iou_p": np.array([1.0, 0.0]), "iou_r": np.array([1.0, 0.0]),
        "comp": np.array([[0.1] * 5, [0.3] * 5]), "suff": np.array([[0.0] * 5, [0.2] * 5]),
        "comp_corrected": np.array([[0.2] * 5, [0.4] * 5]), "suff_corrected": np.array([[0.1] * 5, [0.1] * 5]),
        "evidence_cut": np.array([0, 3]), "n_words": np.array([10, 600]), "n_seen": np.array([10, 500]),
    }
    s = E.summarise(rows)
    assert s["token_f1_macro"][0] == pytest.approx(0.375)
    # pooled: tp 3, pred 10, gold 6 -> P 0.3, R 0.5, F1 0.375
    assert s["token_f1_micro"][0] == pytest.approx(0.375)
    assert s["auprc"] == pytest.approx(0.5)  # NaN documents (no gold words) are left out
    assert s["average_precision"] == pytest.approx(0.25)
    # official IOU-F1: mean P = (1/1 + 0/2)/2 = 1/2, mean R = (1/1 + 0/1)/2 = 1/2 -> F1 1/2
    assert s["iou_f1"] == pytest.approx(0.5)
    assert s["iou_f1_corrected"] == pytest.approx(0.5)  # per-document F1 1 and 0
    assert s["comprehensiveness_aopc"] == pytest.approx(0.2)
    assert s["sufficiency_aopc"] == pytest.approx(0.1)
    assert s["comprehensiveness_aopc_points"] == pytest.approx([0.2] * 5)
    assert s["comprehensiveness_aopc_corrected"] == pytest.approx(0.3)
    assert s["sufficiency_aopc_corrected"] == pytest.approx(0.1)
    assert s["accuracy"] == 0.5
    assert (s["evidence_tokens_cut"], s["documents_truncated"]) == (3, 1)


def test_report_names_every_metric_in_every_format(tmp_path):
    from transexplain.results.store import ResultStore

    out = tmp_path / "r.h5"
    store = ResultStore(out, {"benchmark": "eraser"}, benchmark="eraser")
    summary = {"documents": 2, "k": [5, 10], "token_f1_macro": [0.25, 0.5], "iou_f1": 0.125, "iou_f1_corrected": 0.0625,
               "auprc": 0.75, "average_precision": 0.8, "comprehensiveness_aopc": 0.3, "sufficiency_aopc": 0.1,
               "comprehensiveness_aopc_corrected": 0.2, "sufficiency_aopc_corrected": 0.05, "accuracy": 1.0}
    store.set_summary("rollout", summary)
    store.mark_complete()
    csv = E.report_text(out, "csv").splitlines()
    assert csv[0] == "metric,k,rollout"
    assert csv[1:3] == ["token_f1_macro,5,0.2500", "token_f1_macro,10,0.5000"]
    assert "iou_f1,,0.1250" in csv and "iou_f1_corrected,,0.0625" in csv
    assert "auprc,,0.7500" in csv and "average_precision,,0.8000" in csv
    assert "comprehensiveness_aopc_corrected,,0.2000" in csv and len(csv) == 1 + 2 + len(E.REPORT_METRICS)
    md = E.report_text(out, "markdown")
    assert "| token_f1_macro at k | rollout |" in md and "| auprc | 0.7500 |" in md and "| iou_f1 | 0.1250 |" in md
    tex = E.report_text(out, "latex")
    assert "token\\_f1\\_macro at k & rollout" in tex and "average\\_precision & 0.8000" in tex
