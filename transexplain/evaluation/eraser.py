"""ERASER Movie Reviews: rationale metrics (pure functions), the benchmark runner, and its report.

Word scores (the paper's protocol): token scores are clamped at 0, special tokens are skipped, and a
word's score is the max over its word-pieces. Documents longer than the model's maximum length
(512 for BERT) are truncated as the paper did; the words cut off get no score (never chosen for
token F1 or IOU-F1; an official AOPC bin larger than the words in the window takes them last, in
document order), and the evidence tokens among them are counted (`evidence_tokens_cut`).

Metrics (all in [0, 1]):
- token F1 for the top-k words, k = 5, 10, ..., 80: per document P = |pred ∩ gold| / |pred|,
  R = |pred ∩ gold| / |gold|, F1 = 2PR / (P + R) (0 when P + R = 0); `instance_macro` = mean of the
  per-document F1; `instance_micro` = F1 of the pooled counts (Σ|pred ∩ gold|, Σ|pred|, Σ|gold|);
- IOU-F1 at 0.5: the top-k words with k = the mean human rationale length of the evaluated
  documents (rounded, at least 1) form contiguous predicted spans; a predicted span is a hit when
  its IOU with some gold span is >= 0.5. `iou_f1` is the official scorer's (macro): per document
  P = hits / #pred spans, R = hits / #gold spans (matched *predicted* spans, so R can exceed 1),
  then the F1 of mean P and mean R; `iou_f1_corrected` is ours: R = gold spans matched by some
  predicted span / #gold spans, and the mean of the per-document F1;
- `auprc` (official): the trapezoid area under each document's precision-recall curve (scikit-learn's
  precision_recall_curve + auc over all the document's words), mean over documents with a gold word;
  `average_precision` (official; what we used to call AUPRC): scikit-learn's average precision,
  mean over documents that have both gold and non-gold words;
- comprehensiveness / sufficiency AOPC (official): bins q in 1, 5, 10, 20, 50 % of the document's
  words, k_q = int(q · #words); comp_q = p(c|x) - p(c|x without the top k_q words),
  suff_q = p(c|x) - p(c|only the top k_q words), c the model's predicted class on x; AOPC = the mean
  over bins and documents. `*_aopc_corrected` (ours): c the true class (the one explained) and
  k_q = max(1, round(q · #words inside the model's window)).
docs/metrics.md has the definitions side by side and the values that changed.
"""
from __future__ import annotations

import sys

import numpy as np

K_VALUES = tuple(range(5, 85, 5))
AOPC_FRACTIONS = (0.01, 0.05, 0.10, 0.20, 0.50)


# ---------------------------------------------------------------------------------------- words
def word_scores(token_scores, word_ids, special_mask, n_words: int) -> np.ndarray:
    """(n_words,) word scores: max over a word's pieces of the token scores clamped at 0.

    token_scores: (N,) one sample's token scores; word_ids: (N,) word index per token or None;
    special_mask: (N,) 1 on special tokens (skipped). Words no token maps to (cut off by
    truncation) get -inf so that they are never selected.
    """
    out = np.full(n_words, -np.inf)
    ts = np.clip(np.asarray(token_scores, dtype=np.float64), 0, None)
    for t, w in enumerate(word_ids):
        if w is None or (special_mask is not None and special_mask[t]) or w >= n_words:
            continue
        out[w] = ts[t] if out[w] == -np.inf else max(out[w], ts[t])
    return out


def top_k_words(scores, k: int) -> set:
    """The k best-scored words (ties broken by position, words scored -inf never chosen)."""
    scores = np.asarray(scores, dtype=np.float64)
    order = sorted((i for i in range(len(scores)) if np.isfinite(scores[i])), key=lambda i: (-scores[i], i))
    return set(order[:k])


def precision_recall_f1(pred: set, gold: set) -> tuple:
    """(P, R, F1) of one document: P = |pred∩gold|/|pred| (0 if pred is empty), R likewise on gold."""
    tp = len(pred & gold)
    p = tp / len(pred) if pred else 0.0
    r = tp / len(gold) if gold else 0.0
    f1 = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return p, r, f1


def token_f1(preds: list, golds: list) -> dict:
    """{"instance_macro": mean of per-document F1, "instance_micro": F1 of pooled counts}.

    preds, golds: one set of token indices per document (the same documents in the same order).
    """
    if not preds:
        return {"instance_macro": 0.0, "instance_micro": 0.0}
    f1s = [precision_recall_f1(p, g)[2] for p, g in zip(preds, golds)]
    tp = sum(len(p & g) for p, g in zip(preds, golds))
    n_pred, n_gold = sum(len(p) for p in preds), sum(len(g) for g in golds)
    return {"instance_macro": float(np.mean(f1s)), "instance_micro": micro_f1(tp, n_pred, n_gold)}


def micro_f1(tp: int, n_pred: int, n_gold: int) -> float:
    """F1 from pooled counts: P = tp/n_pred, R = tp/n_gold (0 when a denominator is 0)."""
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def spans(indices) -> list:
    """Maximal runs of consecutive indices as half-open (start, end) pairs, in order."""
    out = []
    for i in sorted(indices):
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def iou(a: tuple, b: tuple) -> float:
    """Intersection over union of two half-open token spans."""
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]))
    union = (a[1] - a[0]) + (b[1] - b[0]) - inter
    return inter / union if union > 0 else 0.0


def iou_match_counts(pred_spans: list, gold_spans: list, threshold: float = 0.5) -> tuple:
    """(hits, found) of one document: the predicted spans whose best IOU with a gold span is
    >= threshold, and the gold spans whose best IOU with a predicted span is >= threshold.

    Repeated spans count once (the official scorer keeps spans in sets)."""
    pred_spans, gold_spans = sorted(set(pred_spans)), sorted(set(gold_spans))
    if not pred_spans or not gold_spans:
        return 0, 0
    hits = sum(1 for p in pred_spans if max(iou(p, g) for g in gold_spans) >= threshold)
    found = sum(1 for g in gold_spans if max(iou(p, g) for p in pred_spans) >= threshold)
    return hits, found


def iou_precision_recall(pred_spans: list, gold_spans: list, threshold: float = 0.5) -> tuple:
    """(P, R) of one document as our corrected IOU-F1 counts them: the share of predicted spans
    with IOU >= threshold to some gold span, and the share of gold spans with IOU >= threshold to
    some predicted span (so R <= 1). Repeated spans count once."""
    pred_spans, gold_spans = sorted(set(pred_spans)), sorted(set(gold_spans))
    if not pred_spans or not gold_spans:
        return 0.0, 0.0
    hits, found = iou_match_counts(pred_spans, gold_spans, threshold)
    return hits / len(pred_spans), found / len(gold_spans)


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p > 0 and r > 0 else 0.0


def iou_f1(hits, n_pred, n_gold) -> float:
    """IOU-F1 as ERASER's official scorer computes it (`partial_match_score`, macro).

    Per document, `hits` = the predicted spans matched (IOU >= threshold) with some gold span;
    P = hits / #predicted spans (documents with at least one predicted span), R = hits / #gold
    spans (documents with at least one gold span: R counts matched *predicted* spans, so it can
    exceed 1); the result is the F1 of the mean P and the mean R (0 when either is 0).
    """
    hits, n_pred, n_gold = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (hits, n_pred, n_gold))
    ps = hits[n_pred > 0] / n_pred[n_pred > 0]
    rs = hits[n_gold > 0] / n_gold[n_gold > 0]
    return _f1(float(ps.mean()) if ps.size else 0.0, float(rs.mean()) if rs.size else 0.0)


def iou_f1_micro(hits, n_pred, n_gold) -> float:
    """The official scorer's micro IOU-F1: F1 of Σhits / Σ#predicted and Σhits / Σ#gold spans."""
    h, npred, ngold = float(np.sum(hits)), float(np.sum(n_pred)), float(np.sum(n_gold))
    return _f1(h / npred if npred else 0.0, h / ngold if ngold else 0.0)


def iou_f1_corrected(pairs: list) -> float:
    """Our corrected IOU-F1: the mean over documents of F1 = 2PR/(P+R) of the (P, R) pairs of
    `iou_precision_recall` (R = matched *gold* spans / gold spans; 0 where P + R = 0)."""
    if not pairs:
        return 0.0
    return float(np.mean([2 * p * r / (p + r) if p + r > 0 else 0.0 for p, r in pairs]))


def _soft_inputs(scores, gold_mask):
    gold = np.asarray(gold_mask, dtype=bool).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    return gold, np.where(np.isfinite(s), s, 0.0)


def auprc(scores, gold_mask) -> float:
    """The official scorer's `auprc` of one document: the trapezoid area under its
    precision-recall curve, ``sklearn.metrics.auc(recall, precision)`` of
    ``sklearn.metrics.precision_recall_curve(gold, scores)`` over every word of the document
    (words scored -inf, i.e. cut off by truncation, count as 0). The curve starts at (R=0, P=1).

    NaN when the document has no gold word (left out of the mean by the caller; the official
    scorer would average it in, as NaN with the scikit-learn of its time).
    """
    from sklearn.metrics import auc, precision_recall_curve

    gold, s = _soft_inputs(scores, gold_mask)
    if not gold.any():
        return float("nan")
    precision, recall, _ = precision_recall_curve(gold.astype(int), s)
    return float(auc(recall, precision))


def average_precision(scores, gold_mask) -> float:
    """The official scorer's `average_precision` of one document: scikit-learn's AP,
    Σ_n (R_n - R_{n-1}) P_n over the thresholds of the ranking (words scored -inf count as 0).

    NaN for a document whose words are all gold or all not gold: the official scorer discards
    those (`discard_single_class_answers`), and so does the mean over documents.
    """
    from sklearn.metrics import average_precision_score

    gold, s = _soft_inputs(scores, gold_mask)
    if gold.all() or not gold.any():
        return float("nan")
    return float(average_precision_score(gold.astype(int), s))


def bin_sizes(n_words: int, fractions=AOPC_FRACTIONS) -> list:
    """Words removed (comprehensiveness) or kept (sufficiency) per bin, ERASER's definition:
    ``int(q · n_words)`` of the whole document (0 for a short document's small bins)."""
    return [int(q * n_words) for q in fractions]


def k_for_fraction(n_words: int, q: float) -> int:
    """Words in the top q for our corrected AOPC: max(1, round(q · n_words)), at most n_words,
    where n_words counts the words inside the model's window."""
    return min(n_words, max(1, int(round(q * n_words))))


def aopc(full_prob, probs) -> float:
    """AOPC = mean over the bins of (p_full - p_bin); `probs` holds one probability per bin."""
    probs = np.asarray(probs, dtype=np.float64)
    return float(np.mean(float(full_prob) - probs)) if probs.size else 0.0


def ranking(scores) -> list:
    """Every word index, best first: scored words by decreasing score (ties by position), then the
    words cut off by truncation (scored -inf) in document order."""
    scores = np.asarray(scores, dtype=np.float64)
    seen = sorted((i for i in range(len(scores)) if np.isfinite(scores[i])), key=lambda i: (-scores[i], i))
    return seen + [i for i in range(len(scores)) if not np.isfinite(scores[i])]


# ---------------------------------------------------------------------------------------- runner
def _tokenize(tokenizer, word_lists, max_length):
    return tokenizer(word_lists, is_split_into_words=True, truncation=True, max_length=max_length, padding=True,
                     return_tensors="pt", return_special_tokens_mask=True)


def as_item(e) -> tuple:
    """(query words, document words, split_at) of an `Example` (or of a bare word list): what the
    model reads (`data.eraser` says how each dataset is encoded)."""
    if isinstance(e, tuple):
        return e
    if isinstance(e, list):
        return ((), tuple(e), None)
    return (tuple(e.query), tuple(e.words), e.split_at)


def subset(item: tuple, keep) -> tuple:
    """The item with only the document words whose index is in `keep` (in document order); the
    query is kept whole and e-SNLI's premise / hypothesis boundary moves with the removed words."""
    query, words, split = item
    kept = tuple(w for j, w in enumerate(words) if j in keep)
    return (query, kept, None if split is None else sum(1 for j in range(split) if j in keep))


def encode(tokenizer, items, max_length: int):
    """Tokenise items (`as_item`) as the model reads them -- the document alone, `[CLS] query [SEP]
    document [SEP]` (the document truncated), or e-SNLI's `[CLS] premise [SEP] hypothesis [SEP]` --
    padded to one batch. Returns (the tokenizer's padded dict of tensors, per item per token the
    index of its document word in `words` or None: special tokens, query tokens, padding).

    An item whose document (or one of e-SNLI's two parts) is empty reads one unknown token there."""
    unk = tokenizer.unk_token or "[UNK]"
    items = [as_item(i) for i in items]
    if all(not q and split is None for q, _, split in items):  # one sequence each: one batched call, as always
        enc = tokenizer([list(w) or [unk] for _, w, _ in items], is_split_into_words=True, truncation=True,
                        max_length=max_length, padding=True, return_tensors="pt", return_special_tokens_mask=True)
        return enc, [[None if (w is None or not words) else w for w in enc.word_ids(i)]
                     for i, (_, words, _) in enumerate(items)]
    singles, word_ids = [], []
    for q, words, split in items:
        if q:
            first, second, offset, strategy = list(q), list(words) or [unk], None, "only_second"
        elif split is not None:
            first, second, offset, strategy = list(words[:split]) or [unk], list(words[split:]) or [unk], split, "longest_first"
        else:
            first, second, offset, strategy = list(words) or [unk], None, 0, True
        one = tokenizer(first, second, is_split_into_words=True, truncation=strategy, max_length=max_length,
                        return_special_tokens_mask=True)
        seq = one.sequence_ids(0)
        ids = []
        for w, sq in zip(one.word_ids(0), seq):
            if w is None:
                ids.append(None)
            elif q:  # the query is sequence 0: never scored
                ids.append(w if sq == 1 and words else None)
            elif split is not None:
                part = words[:split] if sq == 0 else words[split:]
                ids.append((w if sq == 0 else offset + w) if part else None)
            else:
                ids.append(w if words else None)
        singles.append({k: one[k] for k in ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask")
                        if k in one})
        word_ids.append(ids)
    enc = tokenizer.pad(singles, padding=True, return_tensors="pt")
    width = enc["input_ids"].shape[1]
    return enc, [ids + [None] * (width - len(ids)) for ids in word_ids]


def text_batch(adapter, tokenizer, items, max_length: int):
    """The `TextBatch` of `encode` on the adapter's device, `word_ids` holding the document word indices."""
    from ..models.text import TextBatch

    enc, word_ids = encode(tokenizer, items, max_length)
    tt = enc.get("token_type_ids")
    return TextBatch(enc["input_ids"].long(), enc["attention_mask"].long(), None if tt is None else tt.long(),
                     enc["special_tokens_mask"].long(), word_ids).to(adapter.device)


def _probs(model, tokenizer, word_lists, max_length, batch_size=32) -> np.ndarray:
    """(len(word_lists), C) class probabilities (float64) of `model` on each word list or item
    (`as_item`; an empty document is run as one unknown token)."""
    import torch

    out = []
    for i in range(0, len(word_lists), batch_size):
        enc, _ = encode(tokenizer, word_lists[i:i + batch_size], max_length)
        enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
        with torch.no_grad():
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           **({"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {})).logits
        out.append(logits.double().softmax(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


class InputPool:
    """Distinct model inputs to run once each: `slot(item)` gives an input's position in `inputs`."""

    def __init__(self):
        self.inputs, self.where = [], {}

    def slot(self, item) -> int:
        item = as_item(item)
        if item not in self.where:
            self.where[item] = len(self.inputs)
            self.inputs.append(item)
        return self.where[item]

    def run(self, model, tokenizer, max_length: int) -> np.ndarray:
        return _probs(model, tokenizer, self.inputs, max_length)


def aopc_slots(pool: InputPool, item: tuple, order, sizes) -> list:
    """[(slot without the first k words of `order`, slot with only them)] for each k in `sizes`: the
    inputs of comprehensiveness (removed) and sufficiency (kept), words in document order."""
    out = []
    for k in sizes:
        top = set(order[:k])
        rest = set(range(len(item[1]))) - top
        out.append((pool.slot(subset(item, rest)), pool.slot(subset(item, top))))
    return out


def comp_suff(probs, full: int, slots: list, cls: int) -> tuple:
    """([comp per bin], [suff per bin]): p(cls | full) - p(cls | removed), p(cls | full) - p(cls | kept)."""
    return ([probs[full, cls] - probs[rm, cls] for rm, _ in slots],
            [probs[full, cls] - probs[kp, cls] for _, kp in slots])


def official_aopc(probs, full: int, slots: list) -> tuple:
    """(comp, suff per bin) of ERASER's official definition: the class is the model's prediction on the
    full input (`comp_suff` with c = argmax p(· | full))."""
    return comp_suff(probs, full, slots, int(np.argmax(probs[full])))


FLOAT_ROWS = ("f1", "auprc", "average_precision", "iou_p", "iou_r", "comp", "suff", "comp_corrected",
              "suff_corrected", "p_full", "p_full_label")


def evaluate_batch(adapter, tokenizer, examples, method: str, max_length: int, rationale_k: int,
                   faithfulness: bool = True, precision: str = "float64", options: dict | None = None) -> dict:
    """Explain a batch of examples for their true class and return per-document metric rows.

    precision: the explanation and the comprehensiveness / sufficiency forwards run in it
    (`transexplain.precision`); the model itself is not modified. options: the method's options
    (`explain(..., **options)`, e.g. {"steps": 5}; `--option` of `tx-bench eraser`).
    """
    import torch

    from ..api import explain
    from ..precision import at_precision

    x = text_batch(adapter, tokenizer, examples, max_length)
    labels = [e.label for e in examples]
    expl = explain(adapter, x, method=method, target=torch.tensor(labels), precision=precision, **(options or {}))
    tok = expl.token_map.double().cpu().numpy()
    pred = expl.logits.argmax(-1).cpu().numpy()
    rows = {k: [] for k in ("annotation_id", "label", "pred", "tp", "n_pred", "n_gold", "f1", "auprc",
                            "average_precision", "iou_hits", "iou_found", "iou_n_pred", "iou_n_gold", "iou_p",
                            "iou_r", "comp", "suff", "comp_corrected", "suff_corrected", "p_full", "p_full_label",
                            "evidence_cut", "n_words", "n_seen")}
    pool = InputPool()  # distinct inputs to run, each once

    jobs = []  # per document: (full, official removed / kept, corrected removed / kept)
    for i, e in enumerate(examples):
        n = len(e.words)
        ws = word_scores(tok[i], x.word_ids[i], x.special_mask[i].cpu().numpy(), n)
        gold = e.evidence_tokens
        seen = int(np.isfinite(ws).sum())
        order = ranking(ws)
        scored = order[:seen]
        tps, npred, f1s = [], [], []
        for k in K_VALUES:
            sel = set(scored[:k])
            tps.append(len(sel & gold))
            npred.append(len(sel))
            f1s.append(precision_recall_f1(sel, gold)[2])
        pred_spans = sorted(set(spans(scored[:rationale_k])))
        gold_spans = sorted({(ev.start_token, ev.end_token) for ev in e.evidences})
        hits, found = iou_match_counts(pred_spans, gold_spans)
        p, r = iou_precision_recall(pred_spans, gold_spans)
        gold_mask = np.zeros(n, dtype=bool)
        gold_mask[[j for j in gold if j < n]] = True
        rows["annotation_id"].append(e.annotation_id)
        rows["label"].append(e.label)
        rows["pred"].append(int(pred[i]))
        rows["tp"].append(tps)
        rows["n_pred"].append(npred)
        rows["n_gold"].append(len(gold))
        rows["f1"].append(f1s)
        rows["auprc"].append(auprc(ws, gold_mask))
        rows["average_precision"].append(average_precision(ws, gold_mask))
        rows["iou_hits"].append(hits)
        rows["iou_found"].append(found)
        rows["iou_n_pred"].append(len(pred_spans))
        rows["iou_n_gold"].append(len(gold_spans))
        rows["iou_p"].append(p)
        rows["iou_r"].append(r)
        rows["evidence_cut"].append(sum(1 for j in gold if j < n and not np.isfinite(ws[j])))
        rows["n_words"].append(n)
        rows["n_seen"].append(seen)
        if faithfulness:
            item = as_item(e)
            official = aopc_slots(pool, item, order, bin_sizes(n))
            corrected = aopc_slots(pool, item, scored, [k_for_fraction(seen, q) for q in AOPC_FRACTIONS])
            jobs.append((pool.slot(item), official, corrected))
    if faithfulness:
        probs = pool.run(at_precision(adapter.model, precision), tokenizer, max_length)
        for i, (full, official, corrected) in enumerate(jobs):
            cls = int(np.argmax(probs[full]))  # the official scores follow the model's predicted class
            y = labels[i]  # ours follow the true class, the one explained
            rows["p_full"].append(probs[full, cls])
            rows["p_full_label"].append(probs[full, y])
            comp, suff = official_aopc(probs, full, official)
            rows["comp"].append(comp)
            rows["suff"].append(suff)
            comp, suff = comp_suff(probs, full, corrected, y)
            rows["comp_corrected"].append(comp)
            rows["suff_corrected"].append(suff)
    else:
        nan5 = [float("nan")] * len(AOPC_FRACTIONS)
        for key in ("p_full", "p_full_label"):
            rows[key] = [float("nan")] * len(examples)
        for key in ("comp", "suff", "comp_corrected", "suff_corrected"):
            rows[key] = [nan5] * len(examples)
    return {k: np.asarray(v, dtype=object if k == "annotation_id" else np.float64 if k in FLOAT_ROWS else np.int64)
            for k, v in rows.items()}


def _nanmean(v) -> float:
    v = np.asarray(v, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def summarise(rows: dict) -> dict:
    """The summary numbers of one method from its per-document rows.

    Official ERASER definitions under the official names (`iou_f1`, `auprc`, `average_precision`,
    `comprehensiveness_aopc`, `sufficiency_aopc`); our corrected variants under `*_corrected`.
    """
    n = len(rows["label"])
    if n == 0:
        return {"documents": 0}
    tp, npred, ngold = rows["tp"], rows["n_pred"], rows["n_gold"]
    comp, suff = np.asarray(rows["comp"], dtype=np.float64), np.asarray(rows["suff"], dtype=np.float64)
    return {
        "documents": int(n),
        "k": list(K_VALUES),
        "token_f1_macro": [float(v) for v in np.mean(rows["f1"], axis=0)],
        "token_f1_micro": [micro_f1(int(tp[:, j].sum()), int(npred[:, j].sum()), int(ngold.sum())) for j in range(len(K_VALUES))],
        "iou_f1": iou_f1(rows["iou_hits"], rows["iou_n_pred"], rows["iou_n_gold"]),
        "iou_f1_micro": iou_f1_micro(rows["iou_hits"], rows["iou_n_pred"], rows["iou_n_gold"]),
        "iou_f1_corrected": iou_f1_corrected(list(zip(rows["iou_p"], rows["iou_r"]))),
        "auprc": _nanmean(rows["auprc"]),
        "average_precision": _nanmean(rows["average_precision"]),
        "comprehensiveness_aopc": float(np.mean(comp)),
        "sufficiency_aopc": float(np.mean(suff)),
        "comprehensiveness_aopc_points": [float(v) for v in np.mean(comp, axis=0)],
        "sufficiency_aopc_points": [float(v) for v in np.mean(suff, axis=0)],
        "aopc_thresholds": list(AOPC_FRACTIONS),
        "comprehensiveness_aopc_corrected": float(np.mean(rows["comp_corrected"])),
        "sufficiency_aopc_corrected": float(np.mean(rows["suff_corrected"])),
        "accuracy": float(np.mean(rows["pred"] == rows["label"])),
        "evidence_tokens_cut": int(np.sum(rows["evidence_cut"])),
        "documents_truncated": int(np.sum(rows["n_seen"] < rows["n_words"])),
    }


def run_eraser(examples, model, tokenizer, methods, out, config: dict, batch_size: int = 8, overwrite: bool = False,
               quiet: bool = False, max_length: int | None = None, faithfulness: bool = True,
               precision: str = "float64", device: str = "cpu", shard=None,
               method_options: dict | None = None) -> dict | None:
    """Run every method over `examples`, appending rows to the HDF5 file `out` (resumable).

    Returns {method: summary}. The file's root attribute `benchmark` is "eraser"; each method is a
    group holding one row per document (with the document's `index`) and its summary. precision:
    "float64" (default), "mixed" or "float32", for the explanations and the comprehensiveness /
    sufficiency forwards (the model is not modified; `config` is stored as given).
    shard: the documents this process takes (`evaluation.sharding.Shard`; by default what torchrun
    says, else all): under torchrun each rank writes a shard of `out` and rank 0 merges them into
    `out`; the other ranks return None.
    method_options: {method: {option: value}} (`commands.common.method_options`), passed to every
    explanation of that method; `config` records them (the CLI stores `method_options` when given).
    """
    from tqdm import tqdm

    from .. import interrupt
    from ..models.text import TextAdapter
    from ..precision import check_precision
    from .perturbation import maybe_kill
    from .sharding import from_environment, is_main_process, open_results

    shard = from_environment(block=batch_size) if shard is None else shard
    device = shard.device(device)
    precision = check_precision(precision)
    adapter = TextAdapter(model.to(device), tokenizer)
    max_length = max_length or min(adapter.max_length, 512)
    gold_lengths = [len(e.evidence_tokens) for e in examples if e.evidences]
    rationale_k = max(1, int(round(float(np.mean(gold_lengths))))) if gold_lengths else 1
    part = [(i, examples[i]) for i in shard.indices(len(examples))]

    def run(store):
        total = len(methods) * len(part)
        batches_done = 0
        for mi, method in enumerate(methods):
            start = store.done(method)
            interrupt.progress(mi * len(part) + start, total, "documents")
            bar = tqdm(total=len(part), initial=start, desc=method, leave=False,
                       disable=quiet or not sys.stderr.isatty() or not is_main_process())
            for i in range(start, len(part), batch_size):
                chunk = part[i:i + batch_size]
                rows = evaluate_batch(adapter, tokenizer, [e for _, e in chunk], method, max_length, rationale_k,
                                      faithfulness, precision=precision,
                                      options=(method_options or {}).get(method))
                store.append(method, {"index": np.array([j for j, _ in chunk], dtype=np.int64), **rows})
                interrupt.progress(mi * len(part) + i + len(chunk), total, "documents")
                batches_done += 1
                maybe_kill(batches_done)
                bar.update(len(chunk))
            bar.close()

    full_config = {**config, "benchmark": "eraser", "max_length": max_length, "rationale_k": rationale_k}
    with open_results(out, full_config, overwrite, run, shard=shard, device=device, say=lambda line: None,
                      total=len(examples), unit="documents") as store:
        if store is None:
            return None
        summaries = summarise_stored(store, methods)
        store.mark_complete()
    return summaries


def summarise_stored(store, methods=None) -> dict:
    """Every method's summary recomputed from its per-document rows and written on its group
    (`methods`: by default those of the store's config)."""
    summaries = {}
    for method in methods or store.config.get("methods") or []:
        rows = {name: store.read(method, name) for name in store.names(method)} if store.done(method) else {}
        summaries[method] = summarise(rows) if rows else {"documents": 0}
        store.set_summary(method, summaries[method])
    return summaries


# ---------------------------------------------------------------------------------------- report
def _load(path):
    from ..errors import UserError
    from ..results.store import ResultStore

    store = ResultStore(path)
    if store.benchmark != "eraser":
        raise UserError(f"{path} holds a {store.benchmark or 'unknown'} benchmark, not eraser.")
    groups = set(store.groups())
    order = list(store.config.get("methods") or []) + sorted(groups)
    methods = [g for g in dict.fromkeys(order) if g in groups and (store.summary(g).get("k") or store.done(g))]
    if not methods:
        raise UserError(f"{path} holds no ERASER documents yet: run `tx-bench eraser` first.")
    return store, methods


def _summaries(store, methods):
    """({method: summary}, partial note or ""): an unfinished method is summarised from its stored
    rows (read only, nothing written), and the note says how far each such method got."""
    sums, unfinished = {}, []
    total = store.config.get("documents")
    for m in methods:
        summary = store.summary(m)
        if summary.get("k"):
            sums[m] = summary
            continue
        sums[m] = summarise({name: store.read(m, name) for name in store.names(m)})
        unfinished.append(f"{m} {store.done(m)} of {total if total is not None else '?'} documents")
    note = ("partial: " + ", ".join(unfinished) + " done so far (unfinished run)") if unfinished else ""
    return sums, note


#: the summary numbers besides token F1, by the names the official scorer gives them (ours: *_corrected)
REPORT_METRICS = ("iou_f1", "iou_f1_corrected", "auprc", "average_precision", "comprehensiveness_aopc",
                  "sufficiency_aopc", "comprehensiveness_aopc_corrected", "sufficiency_aopc_corrected", "accuracy")


def _number(v, digits: int) -> str:
    from ..results.tables import _number as number

    return number(v, digits)


def report_text(path, fmt: str = "markdown") -> str:
    """The token-F1 (instance macro) table over k, one column per method, and the other metrics;
    markdown, csv or latex. Every row names its metric (`token_f1_macro` with its k, then
    `iou_f1`, `auprc`, ... as the official scorer names them; our variants end in `_corrected`).

    csv is one table: `metric,k,<methods>`, k empty for the metrics that have none.
    """
    from ..errors import UserError

    if fmt not in ("markdown", "csv", "latex", "json"):
        raise UserError(f"Unknown report format {fmt!r}: choose markdown, csv, latex or json.")
    from ..results.tables import DISPLAY, _value, header_line

    store, methods = _load(path)
    names = [DISPLAY.get(m, m) for m in methods]  # the display names every report uses
    sums, partial = _summaries(store, methods)
    ks = sums[methods[0]]["k"]
    if fmt == "json":
        import json

        from ..results.tables import notes_under_table

        n = sums[methods[0]].get("documents")
        table = {"benchmark": "eraser", "files": [str(path)], "complete": bool(store.is_complete), "partial": partial or None,
                 "header": header_line(store.config, n, "documents"),
                 "caption": "ERASER token F1 (instance macro) of the top-k words, and the other metrics.",
                 "methods": methods, "display_names": dict(zip(methods, names)),
                 "rows": [{"label": f"token_f1_macro at k={k}", "key": f"token_f1_macro/{k}",
                           "values": {m: _value(sums[m]["token_f1_macro"][j]) for m in methods}, "paper": None}
                          for j, k in enumerate(ks)]
                 + [{"label": key, "key": key, "values": {m: _value(sums[m].get(key)) for m in methods}, "paper": None}
                    for key in REPORT_METRICS],
                 "paper_note": None, "environment": store.environments, "config": store.config,
                 "notes": notes_under_table(store, "eraser", "markdown").splitlines()}
        return json.dumps({"tables": [table]}, indent=2)

    def value(m, key):
        v = _value(sums[m].get(key))
        return f"{v:.4f}" if v is not None else "n/a"

    rows = [[str(k)] + [_number(sums[m]["token_f1_macro"][j], 4) for m in methods] for j, k in enumerate(ks)]
    other = [[key] + [value(m, key) for m in methods] for key in REPORT_METRICS]
    if fmt == "csv":
        if partial:
            names = [f"{n} [partial]" if not sums_done(store, m) else n for n, m in zip(names, methods)]
        lines = [["metric", "k"] + names] + [["token_f1_macro"] + r for r in rows] + [[r[0], ""] + r[1:] for r in other]
        return "\n".join(",".join(r) for r in lines) + "\n" + (f"# {partial}\n" if partial else "")
    header = ["token_f1_macro at k"] + names
    if fmt == "markdown":
        def table(head, body):
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])

        n = sums[methods[0]].get("documents", 0)
        flag = f"PARTIAL ({partial}). " if partial else ""
        return (f"{flag}ERASER token F1 (instance macro) of the top-k words, {n} documents\n\n" + table(header, rows)
                + "\n\n" + table(["metric"] + names, other) + "\n")

    def esc(s):
        return s.replace("_", "\\_").replace("%", "\\%")

    from ..results.tables import format_table

    n = sums[methods[0]].get("documents", 0)
    flag = f"PARTIAL ({esc(partial)}). " if partial else ""
    return ("% " + header_line(store.config, n, "documents") + "\n% needs \\usepackage{booktabs}\n\n"
            + format_table(header, rows, "latex", f"{flag}ERASER token F1 (instance macro) of the top-k words, {n} documents.")
            + "\n\n" + format_table(["metric"] + names, other, "latex", "ERASER: the other metrics.") + "\n")


def sums_done(store, method) -> bool:
    return bool(store.summary(method).get("k"))


def plot(path, out_png) -> None:
    """Token F1 (instance macro) against k, one line per method (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store, methods = _load(path)
    sums, partial = _summaries(store, methods)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        s = sums[m]
        ax.plot(s["k"], s["token_f1_macro"], marker="o", label=m)
    ax.set_xlabel("k (top-k words)")
    ax.set_ylabel("token F1 (instance macro)")
    ax.set_title("ERASER Movie Reviews: token F1" + (f"\n{partial}" if partial else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
