"""The other ERASER datasets of the movies format (e-SNLI, BoolQ; FEVER, MultiRC, CoS-E and Evidence
Inference read the same way): fixtures in exactly ERASER's layout (tests/fixtures/eraser_*), the
query + document encoding, the rationale on the document tokens only, and the label check."""
import json
import shutil
from pathlib import Path

import pytest

from transexplain.data.eraser import align_labels, read_eraser
from transexplain.errors import UserError

FIX = Path(__file__).parent / "fixtures"
ESNLI, BOOLQ = FIX / "eraser_esnli" / "esnli", FIX / "eraser_boolq" / "boolq"
from test_evaluate_cli import tx  # noqa: E402 (the same tx-bench subprocess helper)


def test_esnli_premise_then_hypothesis_with_evidence_in_both():
    ex = read_eraser(ESNLI, "test")
    assert [e.classification for e in ex] == ["contradiction", "entailment", "neutral"]
    # e-SNLI's class order: entailment, neutral, contradiction
    assert [e.label for e in ex] == [2, 0, 1] and ex[0].classes == ("entailment", "neutral", "contradiction")
    a = ex[0]
    premise = "a man in a blue shirt is riding a bike down the street .".split()
    hypothesis = "a man is sleeping in his bed .".split()
    assert a.words == premise + hypothesis and a.split_at == len(premise) and a.query == []
    # evidence: premise token 9 ("bike"), hypothesis token 3 ("sleeping") -> 14 + 3 = 17 in the joint index
    assert a.evidence_tokens == {9, 17}
    assert [a.words[j] for j in sorted(a.evidence_tokens)] == ["bike", "sleeping"]
    assert [ev.text for ev in a.evidences] == ["bike", "sleeping"]
    assert ex[2].evidence_tokens == {len("a woman sings on a stage .".split()) + 4}


def test_esnli_line_without_docids_finds_both_documents(tmp_path):
    root = tmp_path / "esnli"
    shutil.copytree(ESNLI, root)
    line = json.loads((ESNLI / "test.jsonl").read_text().splitlines()[0])
    del line["docids"]
    line["evidences"] = [[e for e in line["evidences"][0] if e["docid"].endswith("_hypothesis")]]
    (root / "test.jsonl").write_text(json.dumps(line) + "\n")
    (e,) = read_eraser(root, "test")
    assert e.split_at == 14 and e.evidence_tokens == {17}


def test_boolq_reads_the_question_as_the_query():
    ex = read_eraser(BOOLQ, "test")
    assert [e.classification for e in ex] == ["True", "True", "False"] and [e.label for e in ex] == [1, 1, 0]
    a = ex[0]
    assert a.query == "do good samaritan laws protect those who help at an accident".split()
    assert a.split_at is None and a.words[:7] == "good samaritan laws offer legal protection to".split()
    assert a.evidence_tokens == set(range(7))
    assert a.sentence_starts == [0, 18]
    # the second line's evidence is in the second sentence (tokens 13..20)
    assert [ex[1].words[j] for j in sorted(ex[1].evidence_tokens)] == "is a part of windows essentials software suite".split()


def test_movie_reviews_query_is_not_encoded():
    from transexplain.data.reviews import ensure_reviews

    e = read_eraser(ensure_reviews(0), "test", limit=2)
    assert e[0].query == [] and e[0].split_at is None and e[0].classes == ("NEG", "POS")


def _tok():
    from transexplain.models.text import minilm_dir
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir()))


def test_query_and_document_are_a_sentence_pair_and_only_the_document_is_scored():
    from transexplain.evaluation.eraser import encode

    tok = _tok()
    boolq, esnli = read_eraser(BOOLQ, "test"), read_eraser(ESNLI, "test")
    enc, word_ids = encode(tok, boolq[:2], 512)
    ids = enc["input_ids"][0].tolist()
    tokens = tok.convert_ids_to_tokens(ids)
    q = boolq[0].query
    n_q = len(tok.tokenize(" ".join(q)))
    # [CLS] query [SEP] document [SEP] [PAD]...
    assert tokens[0] == "[CLS]" and tokens[n_q + 1] == "[SEP]"
    assert enc["token_type_ids"][0, 1:n_q + 2].tolist() == [0] * (n_q + 1)
    assert all(w is None for w in word_ids[0][:n_q + 2])  # the query is never scored
    doc = [t for t, w in enumerate(word_ids[0]) if w is not None]
    assert enc["token_type_ids"][0, doc].tolist() == [1] * len(doc)
    # every scored token is a piece of the document word it points at (brute force over the pieces)
    pieces = [p for w in boolq[0].words for p in tok.tokenize(w)]
    assert [tokens[t] for t in doc] == pieces
    assert [word_ids[0][t] for t in doc] == [j for j, w in enumerate(boolq[0].words) for _ in tok.tokenize(w)]
    # padding (the shorter second item) scores nothing
    pad = enc["attention_mask"][1] == 0
    assert pad.any() and all(word_ids[1][t] is None for t in range(len(pad)) if pad[t])
    # e-SNLI: [CLS] premise [SEP] hypothesis [SEP], both parts scored in the joint word index
    enc, word_ids = encode(tok, esnli[:1], 512)
    e = esnli[0]
    scored = [w for w in word_ids[0] if w is not None]
    assert scored == [j for j, w in enumerate(e.words) for _ in tok.tokenize(w)]
    types = enc["token_type_ids"][0].tolist()
    assert [types[t] for t, w in enumerate(word_ids[0]) if w is not None] == [int(j >= e.split_at) for j in scored]


def test_a_long_document_is_truncated_never_the_query():
    from transexplain.data.eraser import Example
    from transexplain.evaluation.eraser import encode

    tok = _tok()
    e = Example("x", "x", 0, ["word"] * 100, query=["is", "it", "true"])
    enc, word_ids = encode(tok, [e], 32)
    assert enc["input_ids"].shape[1] == 32
    assert tok.convert_ids_to_tokens(enc["input_ids"][0, :4].tolist()) == ["[CLS]", "is", "it", "true"]
    assert [w for w in word_ids[0] if w is not None] == list(range(32 - 6))  # 1 + 3 + 1 + doc + 1


def test_labels_map_onto_the_models_classes_by_name_or_are_refused():
    boolq = read_eraser(BOOLQ, "test")
    # a model naming its classes in another order: mapped by name
    align_labels(boolq, {0: "true", 1: "false"}, 2)
    assert [e.label for e in boolq] == [0, 0, 1]
    # unnamed classes: the dataset's own order, when the count fits
    esnli = read_eraser(ESNLI, "test")
    assert [e.label for e in align_labels(esnli, {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, 3)] == [2, 0, 1]
    with pytest.raises(UserError, match="unnamed classes"):
        align_labels(read_eraser(ESNLI, "test"), {0: "LABEL_0", 1: "LABEL_1"}, 2)
    with pytest.raises(UserError, match="do not include contradiction"):
        align_labels(read_eraser(ESNLI, "test"), {0: "NEG", 1: "POS"}, 2)


def test_a_dataset_folder_checks_its_own_classes(tmp_path):
    root = tmp_path / "boolq"
    shutil.copytree(BOOLQ, root)
    line = json.loads((BOOLQ / "test.jsonl").read_text().splitlines()[0])
    line["classification"] = "MAYBE"
    (root / "test.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(UserError, match="not one of boolq's classes"):
        read_eraser(root, "test")


def test_evidence_out_of_range_in_the_hypothesis_is_one_sentence(tmp_path):
    root = tmp_path / "esnli"
    shutil.copytree(ESNLI, root)
    line = json.loads((ESNLI / "test.jsonl").read_text().splitlines()[0])
    line["evidences"][0][1]["end_token"] = 99
    (root / "test.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(UserError, match="out of range for document '3416050480.jpg#4r1c_hypothesis', which has 8"):
        read_eraser(root, "test")


def test_a_model_whose_classes_differ_is_refused_in_one_sentence(tmp_path):
    for cmd in (("eraser",), ("evaluate", "--model", "embedded-text")):
        out = tmp_path / f"{cmd[0]}.h5"
        proc = tx(*cmd, "--method", "saliency", "--data", ESNLI, "--out", out)
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "do not include" in proc.stderr and "contradiction" in proc.stderr
        assert not out.exists()


@pytest.fixture(scope="module")
def boolq_model(tmp_path_factory):
    """The embedded text model with its classes named False / True, saved as a local HF folder."""
    from transexplain.models.text import load_text_model

    model, tok = load_text_model("embedded")
    model.config.id2label = {0: "False", 1: "True"}
    model.config.label2id = {"False": 0, "True": 1}
    path = tmp_path_factory.mktemp("boolq_model") / "minilm-boolq"
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def test_eraser_and_evaluate_run_on_boolq(boolq_model, tmp_path):
    from transexplain.results import ResultStore

    out = tmp_path / "e.h5"
    proc = tx("eraser", "--method", "saliency", "--data", BOOLQ, "--model", boolq_model, "--out", out, "--quiet",
              "--no-faithfulness", "--precision", "float32", "--limit", "2")
    assert proc.returncode == 0, proc.stderr
    store = ResultStore(out)
    assert store.done("saliency") == 2 and store.read("saliency", "label").tolist() == [1, 1]
    out = tmp_path / "s.h5"
    proc = tx("evaluate", "--method", "saliency", "--data", BOOLQ, "--model", boolq_model, "--metric",
              "deletion,relevance_mass,sufficiency", "--precision", "float32", "--limit", "1", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "| method | deletion ↓ | relevance_mass ↑ | sufficiency ↓ |" in proc.stdout
    assert ResultStore(out).read("saliency/relevance_mass", "value").shape == (1,)
