"""ERASER Movie Reviews: rationale metrics (pure functions), the benchmark runner, and its report.

Word scores (the paper's protocol): token scores are clamped at 0, special tokens are skipped, and a
word's score is the max over its word-pieces. Documents longer than the model's maximum length
(512 for BERT) are truncated as the paper did; the words cut off get no score (they are never
chosen), and the evidence tokens among them are counted (`evidence_tokens_cut`).

Metrics (all in [0, 1]):
- token F1 for the top-k words, k = 5, 10, ..., 80: per document P = |pred ∩ gold| / |pred|,
  R = |pred ∩ gold| / |gold|, F1 = 2PR / (P + R) (0 when P + R = 0); `instance_macro` = mean of the
  per-document F1; `instance_micro` = F1 of the pooled counts (Σ|pred ∩ gold|, Σ|pred|, Σ|gold|);
- IOU F1 at 0.5 (ERASER): the top-k words with k = the mean human rationale length of the evaluated
  documents (rounded, at least 1) form contiguous predicted spans; a predicted span counts as a hit
  when its IOU with some gold span is >= 0.5, a gold span is found when some predicted span has
  IOU >= 0.5 with it; per document P = hits / #pred spans, R = found / #gold spans; macro mean of F1;
- AUPRC: average precision of the soft word scores against the gold word mask, mean over documents;
- comprehensiveness / sufficiency at the top q of words, q in 1, 5, 10, 20, 50 %
  (k_q = max(1, round(q · #words))): comp_q = p(y|x) - p(y|x without the top k_q words),
  suff_q = p(y|x) - p(y|only the top k_q words), y the true class; AOPC = the mean over the five q.
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


def iou_precision_recall(pred_spans: list, gold_spans: list, threshold: float = 0.5) -> tuple:
    """(P, R) of one document: the share of predicted spans with IOU >= threshold to some gold span,
    and the share of gold spans with IOU >= threshold to some predicted span."""
    if not pred_spans or not gold_spans:
        return 0.0, 0.0
    hits = sum(1 for p in pred_spans if max(iou(p, g) for g in gold_spans) >= threshold)
    found = sum(1 for g in gold_spans if max(iou(p, g) for p in pred_spans) >= threshold)
    return hits / len(pred_spans), found / len(gold_spans)


def iou_f1(pairs: list) -> float:
    """Macro mean over documents of F1 = 2PR/(P+R) from (P, R) pairs (0 where P + R = 0)."""
    if not pairs:
        return 0.0
    return float(np.mean([2 * p * r / (p + r) if p + r > 0 else 0.0 for p, r in pairs]))


def auprc(scores, gold_mask) -> float:
    """Average precision of soft scores against a 0/1 mask (words scored -inf count as 0).

    AP = Σ_n (R_n - R_{n-1}) P_n over the thresholds of the ranking (scikit-learn's definition);
    NaN when the document has no gold word (excluded from the mean by the caller).
    """
    from sklearn.metrics import average_precision_score

    gold = np.asarray(gold_mask, dtype=bool)
    if not gold.any():
        return float("nan")
    s = np.asarray(scores, dtype=np.float64)
    s = np.where(np.isfinite(s), s, 0.0)
    return float(average_precision_score(gold.astype(int), s))


def k_for_fraction(n_words: int, q: float) -> int:
    """Words in the top q: max(1, round(q · n_words)), at most n_words."""
    return min(n_words, max(1, int(round(q * n_words))))


def aopc(full_prob, probs) -> float:
    """AOPC = mean over the bins of (p_full - p_bin); `probs` holds one probability per bin."""
    probs = np.asarray(probs, dtype=np.float64)
    return float(np.mean(float(full_prob) - probs)) if probs.size else 0.0


# ---------------------------------------------------------------------------------------- runner
def _tokenize(tokenizer, word_lists, max_length):
    return tokenizer(word_lists, is_split_into_words=True, truncation=True, max_length=max_length, padding=True,
                     return_tensors="pt", return_special_tokens_mask=True)


def _probs(model, tokenizer, word_lists, labels, max_length, batch_size=32):
    import torch

    out = []
    for i in range(0, len(word_lists), batch_size):
        chunk = [w if w else [tokenizer.unk_token or "[UNK]"] for w in word_lists[i:i + batch_size]]
        enc = _tokenize(tokenizer, chunk, max_length)
        with torch.no_grad():
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           **({"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {})).logits
        p = logits.double().softmax(-1)
        lab = torch.as_tensor(labels[i:i + batch_size])
        out.extend(p[torch.arange(len(chunk)), lab].tolist())
    return out


def evaluate_batch(adapter, tokenizer, examples, method: str, max_length: int, rationale_k: int,
                   faithfulness: bool = True) -> dict:
    """Explain a batch of examples for their true class and return per-document metric rows."""
    import torch

    from ..api import explain

    enc = _tokenize(tokenizer, [e.words for e in examples], max_length)
    x = adapter.prepare(enc)
    labels = [e.label for e in examples]
    expl = explain(adapter, x, method=method, target=torch.tensor(labels))
    tok = expl.token_map.double().cpu().numpy()
    pred = expl.logits.argmax(-1).cpu().numpy()
    rows = {k: [] for k in ("annotation_id", "label", "pred", "tp", "n_pred", "n_gold", "f1", "auprc",
                            "iou_p", "iou_r", "comp", "suff", "p_full", "evidence_cut", "n_words", "n_seen")}
    masked, kept, bins_labels = [], [], []
    for i, e in enumerate(examples):
        n = len(e.words)
        ws = word_scores(tok[i], x.word_ids[i], x.special_mask[i].cpu().numpy(), n)
        gold = e.evidence_tokens
        seen = int(np.isfinite(ws).sum())
        order = sorted((j for j in range(n) if np.isfinite(ws[j])), key=lambda j: (-ws[j], j))
        tps, npred, f1s = [], [], []
        for k in K_VALUES:
            sel = set(order[:k])
            tps.append(len(sel & gold))
            npred.append(len(sel))
            f1s.append(precision_recall_f1(sel, gold)[2])
        p, r = iou_precision_recall(spans(order[:rationale_k]), [(ev.start_token, ev.end_token) for ev in e.evidences])
        gold_mask = np.zeros(n, dtype=bool)
        gold_mask[list(gold)] = True
        rows["annotation_id"].append(e.annotation_id)
        rows["label"].append(e.label)
        rows["pred"].append(int(pred[i]))
        rows["tp"].append(tps)
        rows["n_pred"].append(npred)
        rows["n_gold"].append(len(gold))
        rows["f1"].append(f1s)
        rows["auprc"].append(auprc(ws, gold_mask))
        rows["iou_p"].append(p)
        rows["iou_r"].append(r)
        rows["evidence_cut"].append(sum(1 for j in gold if not np.isfinite(ws[j])))
        rows["n_words"].append(n)
        rows["n_seen"].append(seen)
        if faithfulness:
            for q in AOPC_FRACTIONS:
                top = set(order[:k_for_fraction(seen, q)])
                masked.append([w for j, w in enumerate(e.words) if j not in top])
                kept.append([w for j, w in enumerate(e.words) if j in top])
                bins_labels.append(e.label)
    if faithfulness:
        model = adapter.model
        full = _probs(model, tokenizer, [e.words for e in examples], labels, max_length)
        pm = _probs(model, tokenizer, masked, bins_labels, max_length)
        pk = _probs(model, tokenizer, kept, bins_labels, max_length)
        nb = len(AOPC_FRACTIONS)
        for i in range(len(examples)):
            rows["p_full"].append(full[i])
            rows["comp"].append([full[i] - v for v in pm[i * nb:(i + 1) * nb]])
            rows["suff"].append([full[i] - v for v in pk[i * nb:(i + 1) * nb]])
    else:
        nan5 = [float("nan")] * len(AOPC_FRACTIONS)
        rows["p_full"] = [float("nan")] * len(examples)
        rows["comp"] = [nan5] * len(examples)
        rows["suff"] = [nan5] * len(examples)
    return {k: np.asarray(v, dtype=object if k == "annotation_id" else np.float64 if k in (
        "f1", "auprc", "iou_p", "iou_r", "comp", "suff", "p_full") else np.int64) for k, v in rows.items()}


def summarise(rows: dict) -> dict:
    """The summary numbers of one method from its per-document rows."""
    n = len(rows["label"])
    if n == 0:
        return {"documents": 0}
    tp, npred, ngold = rows["tp"], rows["n_pred"], rows["n_gold"]
    auprcs = np.asarray(rows["auprc"], dtype=np.float64)
    return {
        "documents": int(n),
        "k": list(K_VALUES),
        "token_f1_macro": [float(v) for v in np.mean(rows["f1"], axis=0)],
        "token_f1_micro": [micro_f1(int(tp[:, j].sum()), int(npred[:, j].sum()), int(ngold.sum())) for j in range(len(K_VALUES))],
        "iou_f1": iou_f1(list(zip(rows["iou_p"], rows["iou_r"]))),
        "auprc": float(np.nanmean(auprcs)) if np.isfinite(auprcs).any() else float("nan"),
        "comprehensiveness_aopc": float(np.mean(rows["comp"])),
        "sufficiency_aopc": float(np.mean(rows["suff"])),
        "accuracy": float(np.mean(rows["pred"] == rows["label"])),
        "evidence_tokens_cut": int(np.sum(rows["evidence_cut"])),
        "documents_truncated": int(np.sum(rows["n_seen"] < rows["n_words"])),
    }


def run_eraser(examples, model, tokenizer, methods, out, config: dict, batch_size: int = 8, overwrite: bool = False,
               quiet: bool = False, max_length: int | None = None, faithfulness: bool = True) -> dict:
    """Run every method over `examples`, appending rows to the HDF5 file `out` (resumable).

    Returns {method: summary}. The file's root attribute `benchmark` is "eraser"; each method is a
    group holding one row per document and its summary.
    """
    from tqdm import tqdm

    from ..models.text import TextAdapter
    from ..results.store import ResultStore

    adapter = TextAdapter(model, tokenizer)
    max_length = max_length or min(adapter.max_length, 512)
    gold_lengths = [len(e.evidence_tokens) for e in examples if e.evidences]
    rationale_k = max(1, int(round(float(np.mean(gold_lengths))))) if gold_lengths else 1
    store = ResultStore(out, {**config, "benchmark": "eraser", "max_length": max_length,
                              "rationale_k": rationale_k}, overwrite=overwrite, benchmark="eraser")
    summaries = {}
    for method in methods:
        start = store.done(method)
        bar = tqdm(total=len(examples), initial=start, desc=method, disable=quiet or not sys.stderr.isatty(), leave=False)
        for i in range(start, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            store.append(method, evaluate_batch(adapter, tokenizer, chunk, method, max_length, rationale_k, faithfulness))
            bar.update(len(chunk))
        bar.close()
        rows = {name: store.read(method, name) for name in store.names(method)}
        summaries[method] = summarise(rows)
        store.set_summary(method, summaries[method])
    store.mark_complete()
    return summaries


# ---------------------------------------------------------------------------------------- report
def _load(path):
    from ..errors import UserError
    from ..results.store import ResultStore

    store = ResultStore(path)
    if store.benchmark != "eraser":
        raise UserError(f"{path} holds a {store.benchmark or 'unknown'} benchmark, not eraser.")
    methods = [g for g in store.groups() if store.summary(g).get("k")]
    if not methods:
        raise UserError(f"{path} holds no finished ERASER method yet: run `tx-bench eraser` to completion first.")
    return store, methods


def report_text(path, fmt: str = "markdown") -> str:
    """The token-F1 (instance macro) table over k, one column per method; markdown, csv or latex.

    markdown and latex add a second table with IOU-F1, AUPRC, comprehensiveness and sufficiency AOPC.
    """
    from ..errors import UserError

    if fmt not in ("markdown", "csv", "latex"):
        raise UserError(f"Unknown report format {fmt!r}: choose markdown, csv or latex.")
    store, methods = _load(path)
    sums = {m: store.summary(m) for m in methods}
    ks = sums[methods[0]]["k"]
    header = ["k"] + methods
    rows = [[str(k)] + [f"{sums[m]['token_f1_macro'][j]:.4f}" for m in methods] for j, k in enumerate(ks)]
    other_names = [("IOU-F1@0.5", "iou_f1"), ("AUPRC", "auprc"), ("comprehensiveness AOPC", "comprehensiveness_aopc"),
                   ("sufficiency AOPC", "sufficiency_aopc"), ("accuracy", "accuracy")]
    other = [[label] + [f"{sums[m].get(key, float('nan')):.4f}" for m in methods] for label, key in other_names]
    if fmt == "csv":
        return "\n".join(",".join(r) for r in [header] + rows) + "\n"
    if fmt == "markdown":
        def table(head, body):
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])

        n = sums[methods[0]].get("documents", 0)
        return (f"ERASER token F1 (instance macro) of the top-k words, {n} documents\n\n" + table(header, rows)
                + "\n\n" + table(["metric"] + methods, other) + "\n")

    def esc(s):
        return s.replace("_", "\\_").replace("%", "\\%")

    def latex(head, body):
        lines = ["\\begin{tabular}{l" + "r" * (len(head) - 1) + "}", "\\hline",
                 " & ".join(esc(h) for h in head) + " \\\\", "\\hline"]
        lines += [" & ".join(esc(c) for c in r) + " \\\\" for r in body]
        return "\n".join(lines + ["\\hline", "\\end{tabular}"])

    return latex(header, rows) + "\n\n" + latex(["metric"] + methods, other) + "\n"


def plot(path, out_png) -> None:
    """Token F1 (instance macro) against k, one line per method (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store, methods = _load(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        s = store.summary(m)
        ax.plot(s["k"], s["token_f1_macro"], marker="o", label=m)
    ax.set_xlabel("k (top-k words)")
    ax.set_ylabel("token F1 (instance macro)")
    ax.set_title("ERASER Movie Reviews: token F1")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
