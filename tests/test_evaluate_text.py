"""The text side of the metric suite (`evaluation.text_suite`, `tx-bench evaluate --model embedded-text`):
hand-worked token sequences, every metric against a brute-force recomputation on a tiny BERT (one
HF forward per perturbed input, loops instead of the pure functions), special / query / padding
tokens never ranked, and the CLI's refusals and a small run."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from transexplain.data.eraser import Evidence, Example
from transexplain.evaluation import text_suite as TS

ENTRY = Path(sys.executable).parent / "tx-bench"
if not ENTRY.exists():
    ENTRY = Path(shutil.which("tx-bench") or ENTRY)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "film", "is", "good", "bad", "plot", "act", "##ing",
         "and", "a", "very", "slow", "story", "fun", "end", "was", "it", "?"]


def tx(*args):
    return subprocess.run([str(ENTRY), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=600)


def _one_sentence(proc):
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return len(lines) == 1 and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------ pure parts
def test_curve_sequences_by_hand():
    # [CLS] 7 8 9 [SEP]; ranked positions 1, 2, 3 with scores 0.1, 0.9, 0.5: most relevant first is
    # position 2 (id 8), then 3 (id 9), then 1 (id 7); counts 0..3
    ids, types, positions = [2, 7, 8, 9, 3], [0] * 5, [1, 2, 3]
    order = TS.removal_order([0.1, 0.9, 0.5])
    assert order.tolist() == [1, 2, 0]
    assert TS.removal_order([0.1, 0.9, 0.5], most_first=False).tolist() == [0, 2, 1]
    rm = TS.curve_sequences(ids, types, positions, order, [0, 1, 2, 3], "remove")
    assert [list(s) for s, _ in rm] == [[2, 7, 8, 9, 3], [2, 7, 9, 3], [2, 7, 3], [2, 3]]
    ins = TS.curve_sequences(ids, types, positions, order, [0, 1, 2, 3], "insert")
    assert [list(s) for s, _ in ins] == [[2, 3], [2, 8, 3], [2, 8, 9, 3], [2, 7, 8, 9, 3]]
    mask = TS.curve_sequences(ids, types, positions, order, [0, 1, 2, 3], "mask", fill_id=4)
    assert [list(s) for s, _ in mask] == [[2, 7, 8, 9, 3], [2, 7, 4, 9, 3], [2, 7, 4, 4, 3], [2, 4, 4, 4, 3]]
    # the token types travel with their tokens: a query (type 0) and a document (type 1)
    rm = TS.curve_sequences([2, 5, 3, 7, 8, 3], [0, 0, 0, 1, 1, 1], [3, 4], TS.removal_order([0.2, 0.8]), [1], "remove")
    assert rm == [((2, 5, 3, 7, 3), (0, 0, 0, 1, 1))]
    # ties go by position (a stable ranking), in both directions
    assert TS.removal_order([0.5, 0.5, 0.5]).tolist() == [0, 1, 2]
    assert TS.removal_order([0.5, 0.5, 0.5], most_first=False).tolist() == [0, 1, 2]


def test_saco_groups_follow_the_image_suite_grouping():
    # n = 5, K = 2: group 0 holds ranks floor(0)..floor(5/2)-1 = 0..1, group 1 ranks 2..4
    assert [list(map(int, g)) for g in TS.saco_token_groups(5, [4, 3, 2, 1, 0], 2)] == [[4, 3], [2, 1, 0]]
    # n < K: empty groups (such a document is NaN in the suite)
    assert [len(g) for g in TS.saco_token_groups(3, [0, 1, 2], 4)] == [0, 1, 1, 1]


def test_metrics_that_do_not_apply_are_refused_by_name():
    from transexplain.errors import UserError

    assert "road_morf" not in TS.text_metrics("all") and "comprehensiveness" in TS.text_metrics("all")
    for m in ("road_morf", "road_lerf", "infidelity", "max_sensitivity"):
        with pytest.raises(UserError, match=m):
            TS.text_metrics(f"deletion,{m}")
    assert TS.text_metrics("sufficiency,deletion") == ["deletion", "sufficiency"]


def test_cascading_stages_of_bert():
    model, _ = _tiny()
    names = [n for n, _ in TS.text_cascading_stages(model)]
    assert names == ["head", "layer1", "layer0", "embeddings"]
    copies = TS.text_cascading_randomisation(model, seed=0)
    # stage 0 changes the head only; the last stage leaves nothing trained of what it reset
    sd0, sd, sdl = copies[0][1].state_dict(), model.state_dict(), copies[-1][1].state_dict()
    changed = {k for k in sd if not torch.equal(sd[k], sd0[k])}
    assert changed and all(k.startswith(("classifier", "bert.pooler")) for k in changed)
    assert not torch.equal(sdl["bert.embeddings.word_embeddings.weight"], sd["bert.embeddings.word_embeddings.weight"])
    again = TS.text_cascading_randomisation(model, seed=0)
    assert all(torch.equal(a[1].state_dict()[k], b[1].state_dict()[k]) for a, b in zip(copies, again) for k in sd)


# ------------------------------------------------------------------- the runner against brute force
def _tiny():
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    import tempfile

    vocab = Path(tempfile.mkdtemp()) / "vocab.txt"
    vocab.write_text("\n".join(WORDS) + "\n")
    tok = BertTokenizerFast(str(vocab))
    torch.manual_seed(3)
    cfg = BertConfig(num_labels=2, num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                     vocab_size=len(WORDS), max_position_embeddings=64, initializer_range=0.2,
                     attn_implementation="eager")
    return BertForSequenceClassification(cfg).eval(), tok


def _examples(query=False):
    texts = [("the film is good and the acting is very fun the end", 1, [(3, 4), (8, 10)]),
             ("a very slow story and a bad plot", 0, [(1, 4), (6, 8)]),
             ("bad film", 0, [(0, 1)])]
    out = []
    for i, (text, label, ev) in enumerate(texts):
        out.append(Example(f"a{i}", f"d{i}", label, text.split(), [Evidence(f"d{i}", s, e) for s, e in ev],
                           classification=("NEG", "POS")[label], query=["was", "it", "good", "?"] if query else []))
    return out


def _trapz(p):
    p = np.asarray(p, dtype=np.float64)
    return float(sum((p[k - 1] + p[k]) / 2 for k in range(1, len(p))) / (len(p) - 1))


def _p(model, ids, types, cls):
    """p(cls | ids) by Hugging Face's own model, one input at a time, in float64."""
    with torch.no_grad():
        logits = model.double()(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits
    return float(logits.double().softmax(-1)[0, cls])


@pytest.mark.parametrize("query", [False, True])
def test_every_metric_equals_a_brute_force_recomputation(query):
    """score_text_method on a batch of three documents of different lengths (padding), with a fixed
    token map that puts large scores on [CLS], [SEP], the query and the padding: those must never be
    ranked, so the brute force, which only ever looks at the document tokens, gives the same numbers."""
    import copy

    from transexplain.evaluation import eraser
    from transexplain.evaluation.metrics import localisation, sanity
    from transexplain.models.text import TextAdapter

    model, tok = _tiny()
    ref = copy.deepcopy(model).double()
    adapter = TextAdapter(model, tok)
    examples = _examples(query)
    x = eraser.text_batch(adapter, tok, examples, 64)
    rng = np.random.default_rng(0)
    tmap = torch.tensor(rng.random(x.input_ids.shape)) + 100.0 * (torch.tensor(
        [[w is None for w in row] for row in x.word_ids]))  # specials, query and padding score 100+
    stage_maps = [torch.tensor(rng.random(x.input_ids.shape)) for _ in range(2)]
    randomised = ["stage0", "stage1"]

    def explain_fn(ad, xx, target):
        return stage_maps[randomised.index(ad)] if isinstance(ad, str) else tmap

    with torch.no_grad():
        prob = model.double()(input_ids=x.input_ids, attention_mask=x.attention_mask,
                              token_type_ids=x.token_type_ids).logits.softmax(-1)
    pred = prob.argmax(-1)
    p_clean = prob.gather(1, pred.view(-1, 1))[:, 0].numpy()
    metrics = list(TS.TEXT_METRICS)
    got = TS.score_text_method(adapter, tok, model.double(), x, examples, pred, p_clean, metrics, explain_fn, 64,
                               forward_batch=4, randomised=randomised)
    steps = TS.TEXT_OPTIONS["curve_steps"]
    for i, e in enumerate(examples):
        c = int(pred[i])
        n_tok = int(x.attention_mask[i].sum())
        ids, types = x.input_ids[i, :n_tok].tolist(), x.token_type_ids[i, :n_tok].tolist()
        doc = [t for t in range(n_tok) if x.word_ids[i][t] is not None]
        # the document tokens are exactly the word pieces of the document's words, none of the query's
        assert [tok.convert_ids_to_tokens(ids[t]).lstrip("#") for t in doc] == \
            [p.lstrip("#") for w in e.words for p in tok.tokenize(w)]
        s = {t: float(tmap[i, t]) for t in doc}
        most = sorted(doc, key=lambda t: (-s[t], t))
        least = sorted(doc, key=lambda t: (s[t], t))
        n = len(doc)
        counts = [n * k // steps for k in range(steps + 1)]

        def seq(keep=None, masked=()):
            keep = range(n_tok) if keep is None else keep
            return ([4 if t in masked else ids[t] for t in keep], [types[t] for t in keep])

        dele = [_p(ref, *seq([t for t in range(n_tok) if t not in most[:k]]), c) for k in counts]
        ins = [_p(ref, *seq([t for t in range(n_tok) if t not in doc or t in most[:k]]), c) for k in counts]
        morf = [_p(ref, *seq(masked=set(most[:k])), c) for k in counts]
        lerf = [_p(ref, *seq(masked=set(least[:k])), c) for k in counts]
        assert got["deletion"]["value"][i] == pytest.approx(_trapz(dele), abs=1e-12)
        assert got["deletion"]["curve"][i] == pytest.approx(dele, abs=1e-12)
        assert got["insertion"]["value"][i] == pytest.approx(_trapz(ins), abs=1e-12)
        assert got["mif"]["value"][i] == pytest.approx(_trapz(morf), abs=1e-12)
        assert got["lif"]["value"][i] == pytest.approx(_trapz(lerf), abs=1e-12)
        assert got["srg"]["value"][i] == pytest.approx(_trapz(lerf) - _trapz(morf), abs=1e-12)
        assert got["aopc"]["value"][i] == pytest.approx(np.mean([morf[0] - v for v in morf]), abs=1e-12)
        assert got["abpc"]["value"][i] == pytest.approx(np.mean(np.array(lerf) - np.array(morf)), abs=1e-12)
        # SaCo: the paper's pair loop over K = 10 groups of the ranked tokens, each masked alone
        k_groups = TS.TEXT_OPTIONS["saco_groups"]
        if n >= k_groups:
            groups = [most[(n * g) // k_groups:(n * (g + 1)) // k_groups] for g in range(k_groups)]
            pert = [_p(ref, *seq(masked=set(g)), c) for g in groups]
            sal = [sum(s[t] for t in g) for g in groups]
            from transexplain.evaluation.metrics.saco import saco_loop

            assert got["saco"]["value"][i] == pytest.approx(saco_loop(sal, float(p_clean[i]), pert), abs=1e-12)
        else:
            assert np.isnan(got["saco"]["value"][i])
        # localisation: the human rationale's word pieces as the mask, by loops
        gold = [t for t in doc if x.word_ids[i][t] in e.evidence_tokens]
        top = max(s.values())
        assert got["pointing_game"]["value"][i] == float(any(s[t] == top for t in gold))
        assert got["relevance_mass"]["value"][i] == pytest.approx(sum(s[t] for t in gold) / sum(s.values()), abs=1e-12)
        assert got["relevance_rank"]["value"][i] == pytest.approx(len(set(most[:len(gold)]) & set(gold)) / len(gold))
        # randomisation: Spearman over the document tokens, mean over the stages
        from scipy.stats import spearmanr

        rhos = [spearmanr([s[t] for t in doc], [float(m[i, t]) for t in doc]).statistic for m in stage_maps]
        assert got["randomisation"]["value"][i] == pytest.approx(np.mean(rhos), abs=1e-12)
        assert got["randomisation"]["per_stage"][i] == pytest.approx(rhos, abs=1e-12)
        assert sanity is not None and localisation is not None
    # comprehensiveness / sufficiency: ERASER's official port (tests/test_official_scorers.py) on
    # probabilities recomputed word list by word list: bins int(q · #words), words by the ERASER word
    # score (max of the clamped piece scores), removed / kept in document order, the predicted class
    from test_official_scorers import port_aopc

    comp_inst, suff_inst = [], []
    for i, e in enumerate(examples):
        ws = {}
        for t, w in enumerate(x.word_ids[i]):
            if w is not None:
                ws[w] = max(ws.get(w, 0.0), max(0.0, float(tmap[i, t])))
        order = sorted(range(len(e.words)), key=lambda j: (-ws[j], j))

        def probs(words):
            q = e.query
            enc = tok(q, words or ["[UNK]"], is_split_into_words=True) if q else tok(words or ["[UNK]"], is_split_into_words=True)
            with torch.no_grad():
                return ref(input_ids=torch.tensor([enc["input_ids"]]),
                           token_type_ids=torch.tensor([enc["token_type_ids"]])).logits.double().softmax(-1)[0].numpy()

        full = probs(e.words)
        bins = [int(q * len(e.words)) for q in (0.01, 0.05, 0.10, 0.20, 0.50)]
        comp_inst.append({"full": full, "comp": [probs([w for j, w in enumerate(e.words) if j not in order[:k]]) for k in bins]})
        suff_inst.append({"full": full, "suff": [probs([w for j, w in enumerate(e.words) if j in order[:k]]) for k in bins]})
        assert got["comprehensiveness"]["value"][i] == pytest.approx(port_aopc(comp_inst[-1:], "comp"), abs=1e-12)
        assert got["sufficiency"]["value"][i] == pytest.approx(port_aopc(suff_inst[-1:], "suff"), abs=1e-12)
    assert np.mean(got["comprehensiveness"]["value"]) == pytest.approx(port_aopc(comp_inst, "comp"), abs=1e-12)


def test_suite_comprehensiveness_is_the_eraser_runners_number():
    """The same explanation (explained for the true class, which the tiny model predicts for these
    documents or not): `tx-bench eraser`'s official `comp` rows and the suite's per-document values
    come from the same lifted functions, so they are equal when the explained class is the same."""
    from transexplain import explain
    from transexplain.evaluation import eraser
    from transexplain.models.text import TextAdapter

    model, tok = _tiny()
    adapter = TextAdapter(model, tok)
    examples = _examples()
    rows = eraser.evaluate_batch(adapter, tok, examples, "saliency", 64, 2)
    x = eraser.text_batch(adapter, tok, examples, 64)
    labels = torch.tensor([e.label for e in examples])

    def explain_fn(ad, xx, target):  # the eraser runner explains the true class
        return explain(ad, xx, method="saliency", target=labels, precision="float64").token_map

    with torch.no_grad():
        prob = model.double()(input_ids=x.input_ids, attention_mask=x.attention_mask).logits.softmax(-1)
    pred = prob.argmax(-1)
    got = TS.score_text_method(adapter, tok, model.double(), x, examples, pred, prob.max(-1).values.numpy(),
                               ["comprehensiveness", "sufficiency"], explain_fn, 64)
    assert got["comprehensiveness"]["curve"] == pytest.approx(rows["comp"], abs=1e-12)
    assert got["sufficiency"]["value"] == pytest.approx(rows["suff"].mean(1), abs=1e-12)


# ------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("metric,why", [("road_morf", "imputation"), ("deletion,infidelity", "discrete"),
                                        ("max_sensitivity", "discrete")])
def test_image_only_metrics_are_refused_for_text_before_any_work(tmp_path, metric, why):
    out = tmp_path / "r.h5"
    proc = tx("evaluate", "--model", "embedded-text", "--method", "rollout", "--metric", metric, "--out", out)
    assert proc.returncode == 2 and _one_sentence(proc), proc.stderr
    assert metric.split(",")[-1] in proc.stderr and why in proc.stderr and "No --data" not in proc.stdout
    assert not out.exists()


def test_text_metric_on_an_image_model_is_refused(tmp_path):
    proc = tx("evaluate", "--method", "rollout", "--metric", "comprehensiveness", "--out", tmp_path / "r.h5")
    assert proc.returncode == 2 and _one_sentence(proc) and "comprehensiveness" in proc.stderr, proc.stderr
    assert not (tmp_path / "r.h5").exists()


def test_small_text_run_stores_per_document_values_and_reports(tmp_path):
    from transexplain.results import ResultStore

    out = tmp_path / "t.h5"
    args = ("evaluate", "--model", "embedded-text", "--method", "saliency,random",
            "--metric", "deletion,pointing_game,comprehensiveness", "--limit", "2", "--batch-size", "2",
            "--precision", "float32", "--out", out, "--quiet")
    proc = tx(*args)
    assert proc.returncode == 0, proc.stderr
    assert "| method | deletion ↓ | pointing_game ↑ | comprehensiveness ↑ |" in proc.stdout, proc.stdout
    assert "Kendall τ" in proc.stdout and "2 documents" in proc.stdout
    store = ResultStore(out)
    assert store.is_complete and store.config["metrics"] == ["deletion", "pointing_game", "comprehensiveness"]
    assert store.config["benchmark"] == "suite" and store.done("images") == 2
    assert store.read("saliency/deletion", "curve").shape == (2, 17)
    assert store.read("saliency/comprehensiveness", "curve").shape == (2, 5)
    assert set(store.read("saliency/pointing_game", "value")) <= {0.0, 1.0}
    again = tx(*args)
    assert again.returncode == 0 and "already holds this complete run" in again.stdout
