"""The metric suite on text: the faithfulness, localisation and sanity metrics of `tx-bench evaluate`
on a BERT-family classifier and an ERASER dataset (the embedded reviews by default).

The metrics are the image suite's pure functions (`evaluation.metrics`) fed with token scores, plus
ERASER's comprehensiveness / sufficiency (`evaluation.eraser`, the official definition). What is
ranked: the **document tokens** the model reads -- word pieces inside the window that belong to the
document; never [CLS] / [SEP] / padding, never the query's tokens (BoolQ, FEVER, ...: the query has
no rationale). Each document's token scores form a (1, 1, n) map for the pure functions (n the
document tokens of that example), so padding is never a pixel. The explained class is the model's
prediction on the clean input (as in the image suite); probabilities are softmax probabilities of
that class. Token-level protocol (`TEXT_OPTIONS`, stored in the run's config):

* `deletion` / `insertion` (Petsiuk et al. 2018, on tokens): the removal baseline of ERASER
  (DeYoung et al. 2020) -- deletion *removes* the document tokens, most relevant first, from the
  input (the sequence gets shorter, as comprehensiveness removes words); insertion starts from the
  input without its document tokens (`[CLS] [SEP]`, or `[CLS] query [SEP] [SEP]`) and puts them
  back, most relevant first, at their places (as sufficiency keeps words). 17 points at
  ``floor(n k / 16)`` tokens, the normalised trapezoid AUC of `metrics.curves`.
* `mif` / `lif` / `srg`, `aopc` / `abpc`, `saco`: the occlusion family replaces tokens by the
  tokenizer's mask token (`[MASK]`; the unknown token for a tokenizer without one), keeping the
  length and the positions -- the text counterpart of the image suite's mean occluder (Blücher et
  al. 2024 separate the ranking from the occluder; so do we: removal for deletion / insertion,
  [MASK] for this family). SaCo: K = 10 groups of equal size by rank, each masked on its own; a
  document with fewer than K tokens has empty groups and is NaN.
* `comprehensiveness` / `sufficiency`: ERASER's official AOPC per document (bins 1, 5, 10, 20, 50 %
  of the document's words, the predicted class, words removed / kept and the text re-tokenised),
  computed by the functions `tx-bench eraser` uses; word scores are ERASER's (token scores clamped
  at 0, max over a word's pieces). The stored `curve` holds the five bins.
* `pointing_game` / `relevance_mass` / `relevance_rank` (`metrics.localisation`): the human
  rationale as the mask -- a document token is inside when its word is in an evidence span. NaN
  for a document whose rationale lies outside the window (empty mask) or a constant map.
* `randomisation` (Adebayo et al. 2018, cascading): the classifier head (with BERT's pooler), then
  the encoder layers from the top, then the embeddings are re-initialised stage by stage (each
  module's `reset_parameters`, seeded per stage); Spearman ρ over the document tokens.

Not for text (refused before any work, `NOT_FOR_TEXT`): ROAD, infidelity, max-sensitivity.

Store layout: the image suite's (`evaluation.suite`): `images` (index, name = annotation id, label,
pred, p_clean), `<method>/<metric>` (value, and curve / per_stage), benchmark "suite", so
`results.suite_report` reads a text run unchanged.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from .. import interrupt
from ..errors import UserError
from .metrics import METRICS, curves, localisation, saco, sanity
from .metrics._common import removal_rank, step_counts

#: the metrics that apply to text, in the suite's order
TEXT_METRICS = ("insertion", "deletion", "mif", "lif", "srg", "aopc", "abpc", "saco", "pointing_game",
                "relevance_mass", "relevance_rank", "randomisation", "comprehensiveness", "sufficiency")
#: metric -> why it does not apply to text (one sentence each)
NOT_FOR_TEXT = {
    "road_morf": "ROAD fills removed pixels by noisy linear imputation from their neighbours on the image grid, "
                 "which has no counterpart for discrete tokens",
    "road_lerf": "ROAD fills removed pixels by noisy linear imputation from their neighbours on the image grid, "
                 "which has no counterpart for discrete tokens",
    "infidelity": "it adds Gaussian noise to the input and token ids are discrete (noise on the embeddings would "
                  "measure an input the map was not computed for)",
    "max_sensitivity": "it explains copies of the input moved by small uniform noise and token ids are discrete",
}
TEXT_OPTIONS = {"unit": "document tokens (word pieces)", "curve_steps": curves.STEPS,
                "deletion": "remove", "insertion": "insert into the input without its document tokens",
                "occluder": "mask token", "saco_groups": saco.GROUPS, "aopc": "eraser-official", "seed": 0,
                "target": "pred", "query": "first sequence, not ranked"}


def text_metrics(spec: str) -> list:
    """`--metric` for a text model: 'all' is every metric that applies to text; a name that does
    not apply is refused in one sentence naming it and why."""
    from .metrics import resolve_metrics

    if spec.strip() == "all":
        return [m for m in TEXT_METRICS]
    names = resolve_metrics(spec)
    bad = [m for m in names if m in NOT_FOR_TEXT]
    if bad:
        raise UserError(f"{bad[0]} does not apply to a text model: {NOT_FOR_TEXT[bad[0]]}; leave it out of --metric.")
    return [m for m in TEXT_METRICS if m in names]


# ---------------------------------------------------------------------------------------- pure parts
def removal_order(scores, most_first: bool = True) -> np.ndarray:
    """(n,) token scores -> the token indices in removal order (the image suite's stable ranking,
    `_common.removal_rank`, on a (1, 1, n) map)."""
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64)).view(1, 1, -1)
    rank = removal_rank(s, most_first).view(-1).numpy()
    return np.argsort(rank, kind="stable")


def curve_sequences(ids, types, positions, order, counts, mode: str, fill_id: int | None = None) -> list:
    """The inputs of one curve: for each count c, (ids, token types) of the sequence with the first c
    ranked tokens (`positions[order[:c]]`) removed (`mode="remove"`), masked with `fill_id`
    ("mask"), or with only them kept among the ranked tokens ("insert"); other tokens ([CLS], the
    query, [SEP]) always stay. ids, types: the example's unpadded token ids and token types."""
    out = []
    ids, types = list(ids), list(types)
    positions = np.asarray(positions, dtype=np.int64)
    ranked = set(positions.tolist())
    for c in counts:
        chosen = set(positions[np.asarray(order[:c], dtype=np.int64)].tolist())
        if mode == "remove":
            keep = [t for t in range(len(ids)) if t not in chosen]
        elif mode == "insert":
            keep = [t for t in range(len(ids)) if t not in ranked or t in chosen]
        elif mode == "mask":
            out.append((tuple(fill_id if t in chosen else i for t, i in enumerate(ids)), tuple(types)))
            continue
        else:
            raise ValueError(f"unknown mode {mode!r}")
        out.append((tuple(ids[t] for t in keep), tuple(types[t] for t in keep)))
    return out


def saco_token_groups(n: int, order, groups: int = saco.GROUPS) -> list:
    """K lists of token indices: group g holds the tokens of ranks floor(n g / K) .. floor(n (g+1) / K) - 1
    (`metrics.saco`'s grouping, on n tokens)."""
    return [list(np.asarray(order)[(n * g) // groups:(n * (g + 1)) // groups]) for g in range(groups)]


def text_cascading_stages(model) -> list:
    """[(name, [modules])] from the top: the classification head (with BERT's pooler and DistilBERT's
    pre-classifier), the encoder layers from the last to the first, the embeddings."""
    kind = next((k for k in ("bert", "roberta", "electra", "distilbert") if hasattr(model, k)), None)
    if kind is None:
        raise UserError(f"The randomisation check does not know the layers of {type(model).__name__}.")
    enc = getattr(model, kind)
    head = [m for m in (getattr(enc, "pooler", None), getattr(model, "pre_classifier", None),
                        getattr(model, "classifier", None)) if isinstance(m, torch.nn.Module)]
    layers = enc.encoder.layer if hasattr(enc, "encoder") else enc.transformer.layer
    return [("head", head)] + [(f"layer{i}", [layers[i]]) for i in reversed(range(len(layers)))] + \
        [("embeddings", [enc.embeddings])]


def text_cascading_randomisation(model, seed: int = 0) -> list:
    """[(stage name, model copy)]: copy k has stages 0..k re-initialised (`reset_parameters` of each
    sub-module, seeded per stage), as `suite.cascading_randomisation` does for the vision models."""
    current = copy.deepcopy(model)
    out = []
    for k, (name, _) in enumerate(text_cascading_stages(model)):
        modules = dict(text_cascading_stages(current))[name]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            for module in modules:
                for sub in module.modules():
                    if hasattr(sub, "reset_parameters"):
                        sub.reset_parameters()
        out.append((name, copy.deepcopy(current)))
    return out


def run_sequences(model, seqs: list, pad_id: int, forward_batch: int = 64) -> np.ndarray:
    """(len(seqs), C) float64 class probabilities of (ids, types) sequences, padded per chunk (the
    sequences taken by length, so that chunks pad little)."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out = [None] * len(seqs)
    with torch.no_grad():
        for a in range(0, len(order), forward_batch):
            chunk = order[a:a + forward_batch]
            width = max(len(seqs[i][0]) for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            types = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, i in enumerate(chunk):
                n = len(seqs[i][0])
                ids[r, :n] = torch.tensor(seqs[i][0])
                types[r, :n] = torch.tensor(seqs[i][1])
                mask[r, :n] = 1
            kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
            if getattr(model.config, "type_vocab_size", 0) and getattr(model.config, "model_type", "") != "distilbert":
                kwargs["token_type_ids"] = types.to(device)
            p = model(**kwargs).logits.double().softmax(-1).cpu().numpy()
            for r, i in enumerate(chunk):
                out[i] = p[r]
    return np.stack(out) if out else np.zeros((0, 0))


class _Pool:
    """Distinct token sequences, each run once."""

    def __init__(self):
        self.seqs, self.where = [], {}

    def slots(self, seqs) -> list:
        out = []
        for s in seqs:
            if s not in self.where:
                self.where[s] = len(self.seqs)
                self.seqs.append(s)
            out.append(self.where[s])
        return out


# ---------------------------------------------------------------------------------------- runner
def score_text_method(adapter, tokenizer, model, x, examples, pred, p_clean, metrics, explain_fn, max_length,
                      forward_batch: int = 64, randomised=(), precision: str = "float64") -> dict:
    """Every chosen metric of one method on one batch of examples: {metric: {"value": (B,), ...}}.
    explain_fn(adapter, x, target) -> (B, T) token scores; model: the model the forwards run on."""
    from . import eraser

    opts = TEXT_OPTIONS
    tok_map = explain_fn(adapter, x, pred).double().cpu().numpy()
    b = len(examples)
    ids_all = x.input_ids.cpu().numpy()
    mask_all = x.attention_mask.cpu().numpy()
    types_all = (x.token_type_ids.cpu().numpy() if x.token_type_ids is not None else np.zeros_like(ids_all))
    fill_id = tokenizer.mask_token_id if tokenizer.mask_token_id is not None else tokenizer.unk_token_id
    steps, k_groups = opts["curve_steps"], opts["saco_groups"]
    want = set(metrics)
    pool = _Pool()
    per = []  # per example: what its metrics need
    for i in range(b):
        length = int(mask_all[i].sum())
        ids, types = ids_all[i, :length].tolist(), types_all[i, :length].tolist()
        positions = np.array([t for t in range(length) if x.word_ids[i][t] is not None], dtype=np.int64)
        scores = tok_map[i, positions]
        n = len(positions)
        job = {"positions": positions, "scores": scores, "n": n}
        if n:
            morf, lerf = removal_order(scores, True), removal_order(scores, False)
            counts = step_counts(n, steps)
            if "deletion" in want:
                job["del"] = pool.slots(curve_sequences(ids, types, positions, morf, counts, "remove"))
            if "insertion" in want:
                job["ins"] = pool.slots(curve_sequences(ids, types, positions, morf, counts, "insert"))
            if want & {"mif", "srg", "aopc", "abpc"}:
                job["morf"] = pool.slots(curve_sequences(ids, types, positions, morf, counts, "mask", fill_id))
            if want & {"lif", "srg", "abpc"}:
                job["lerf"] = pool.slots(curve_sequences(ids, types, positions, lerf, counts, "mask", fill_id))
            if "saco" in want:
                groups = saco_token_groups(n, morf, k_groups)
                job["saco_s"] = np.array([scores[g].sum() if len(g) else 0.0 for g in groups])
                masked = [set(positions[np.asarray(g, dtype=np.int64)].tolist()) for g in groups]
                job["saco"] = pool.slots([(tuple(fill_id if t in chosen else v for t, v in enumerate(ids)), tuple(types))
                                          for chosen in masked])
        per.append(job)
    probs = run_sequences(model, pool.seqs, tokenizer.pad_token_id or 0, forward_batch) if pool.seqs else None
    pred_np = pred.cpu().numpy()

    def curve(key, i):
        return probs[per[i][key], pred_np[i]] if key in per[i] else np.full(steps + 1, np.nan)

    def values(fn, *keys):
        out = np.full(b, np.nan)
        for i in range(b):
            if per[i]["n"] and all(k in per[i] for k in keys):
                out[i] = fn(*[curve(k, i)[None] for k in keys], per[i]["scores"][None])[0]
        return out

    out = {}
    for m in metrics:
        if m == "deletion":
            out[m] = {"value": values(curves.deletion, "del"), "curve": np.stack([curve("del", i) for i in range(b)])}
        elif m == "insertion":
            out[m] = {"value": values(curves.insertion, "ins"), "curve": np.stack([curve("ins", i) for i in range(b)])}
        elif m == "mif":
            out[m] = {"value": values(curves.mif, "morf"), "curve": np.stack([curve("morf", i) for i in range(b)])}
        elif m == "lif":
            out[m] = {"value": values(curves.lif, "lerf"), "curve": np.stack([curve("lerf", i) for i in range(b)])}
        elif m == "srg":
            out[m] = {"value": values(curves.srg, "morf", "lerf")}
        elif m == "aopc":
            out[m] = {"value": values(curves.aopc, "morf")}
        elif m == "abpc":
            out[m] = {"value": values(curves.abpc, "lerf", "morf")}
        elif m == "saco":
            v = np.full(b, np.nan)
            for i in range(b):
                if per[i]["n"] >= k_groups:
                    v[i] = saco.saco(per[i]["saco_s"][None], p_clean[i:i + 1], curve("saco", i)[None],
                                     per[i]["scores"][None])[0]
            out[m] = {"value": v}
        elif m in ("pointing_game", "relevance_mass", "relevance_rank"):
            fn = {"pointing_game": localisation.pointing_game, "relevance_mass": localisation.relevance_mass_accuracy,
                  "relevance_rank": localisation.relevance_rank_accuracy}[m]
            v = np.full(b, np.nan)
            for i, e in enumerate(examples):
                if per[i]["n"]:
                    gold = e.evidence_tokens
                    mask = np.array([x.word_ids[i][t] in gold for t in per[i]["positions"]], dtype=np.int64)
                    v[i] = fn(per[i]["scores"][None, None], mask[None, None])[0]
            out[m] = {"value": v}
        elif m == "randomisation":
            stages = [explain_fn(ra, x, pred).double().cpu().numpy() for ra in randomised]
            v, rho = np.full(b, np.nan), np.full((b, len(stages)), np.nan)
            for i in range(b):
                if per[i]["n"]:
                    pos = per[i]["positions"]
                    rand = np.stack([s[i, pos] for s in stages])[:, None, None, :]
                    value, stage_rho = sanity.randomisation(per[i]["scores"][None, None], rand)
                    v[i], rho[i] = value[0], stage_rho[0]
            out[m] = {"value": v, "per_stage": rho}
    if want & {"comprehensiveness", "sufficiency"}:
        words_pool = eraser.InputPool()
        jobs = []
        for i, e in enumerate(examples):
            special = x.special_mask[i].cpu().numpy() if x.special_mask is not None else None
            ws = eraser.word_scores(tok_map[i], x.word_ids[i], special, len(e.words))
            item = eraser.as_item(e)
            jobs.append((words_pool.slot(item), eraser.aopc_slots(words_pool, item, eraser.ranking(ws),
                                                                 eraser.bin_sizes(len(e.words)))))
        wprobs = words_pool.run(model, tokenizer, max_length)
        comp, suff = [], []
        for full, slots in jobs:
            c, s = eraser.official_aopc(wprobs, full, slots)
            comp.append(c)
            suff.append(s)
        comp, suff = np.asarray(comp, dtype=np.float64), np.asarray(suff, dtype=np.float64)
        if "comprehensiveness" in want:
            out["comprehensiveness"] = {"value": comp.mean(1), "curve": comp}
        if "sufficiency" in want:
            out["sufficiency"] = {"value": suff.mean(1), "curve": suff}
    return {m: out[m] for m in metrics}


def run_text_suite(examples, model, tokenizer, store, methods, metrics, limit=None, batch_size: int = 8,
                   forward_batch: int = 64, device: str = "cpu", quiet: bool = False, precision: str = "float64",
                   max_length: int | None = None, shard=None, method_options: dict | None = None) -> dict:
    """Every chosen metric for every method over `examples` (`data.eraser.Example`, labels aligned
    with the model), resuming from `store`'s last committed batch. Returns `suite.summarise`.
    method_options: {method: {option: value}} (`commands.common.method_options`), passed to every
    explanation of that method -- on the clean inputs and on the randomised models alike, as the
    image suite's `explainer_of` does."""
    from ..api import explain
    from ..models.text import TextAdapter
    from ..precision import at_precision, check_precision
    from .eraser import text_batch
    from .perturbation import maybe_kill, progress_bar
    from .sharding import WHOLE
    from .suite import summarise

    precision = check_precision(precision)
    model = model.to(device).eval()
    adapter = TextAdapter(model, tokenizer)
    max_length = max_length or min(adapter.max_length, 512)
    fwd_model = at_precision(model, precision)
    randomised = ([TextAdapter(m, tokenizer) for _, m in text_cascading_randomisation(model, TEXT_OPTIONS["seed"])]
                  if "randomisation" in metrics else [])

    stop = len(examples) if limit is None else min(limit, len(examples))
    part = list((shard or WHOLE).indices(stop))
    done = store.position
    bar = progress_bar(len(part), done, quiet, "evaluate")
    interrupt.progress(done, len(part))
    batches_done = 0
    for a in range(done, len(part), batch_size):
        idx = part[a:a + batch_size]
        chunk = [examples[j] for j in idx]
        x = text_batch(adapter, tokenizer, chunk, max_length)
        with torch.no_grad():
            kwargs = {"input_ids": x.input_ids, "attention_mask": x.attention_mask}
            if x.token_type_ids is not None and getattr(model.config, "model_type", "") != "distilbert":
                kwargs["token_type_ids"] = x.token_type_ids
            prob = fwd_model(**kwargs).logits.double().softmax(-1)
        pred = prob.argmax(-1).cpu()
        p_clean = prob.gather(1, pred.view(-1, 1).to(prob.device))[:, 0].cpu().numpy()
        index = np.array(idx, dtype=np.int64)
        rows = {"images": {"index": index, "name": np.array([e.annotation_id for e in chunk], dtype=object),
                           "label": np.array([e.label for e in chunk], dtype=np.int64), "pred": pred.numpy(),
                           "p_clean": p_clean}}
        for method in methods:
            def explain_fn(ad, xx, target, method=method, options=(method_options or {}).get(method, {})):
                return explain(ad, xx, method=method, target=target, precision=precision,
                               **options).token_map.detach()

            scores = score_text_method(adapter, tokenizer, fwd_model, x, chunk, pred, p_clean, metrics, explain_fn,
                                       max_length, forward_batch, randomised, precision)
            for m, cols in scores.items():
                rows[f"{method}/{m}"] = {"index": index, **{k: np.asarray(v) for k, v in cols.items()}}
        position = a + len(idx)
        store.write_batch(rows, position=position)
        interrupt.progress(position, len(part))
        batches_done += 1
        bar.update(position - bar.n)
        maybe_kill(batches_done)
    bar.close()
    return summarise(store, methods, metrics)


__all__ = ["TEXT_METRICS", "NOT_FOR_TEXT", "TEXT_OPTIONS", "text_metrics", "removal_order", "curve_sequences",
           "saco_token_groups", "text_cascading_stages", "text_cascading_randomisation", "run_sequences",
           "score_text_method", "run_text_suite", "METRICS"]
