"""The ERASER reader on fixtures in exactly the official layout, and the embedded review generator."""
import json
import warnings

import pytest

from transexplain.data import reviews
from transexplain.data.eraser import read_eraser
from transexplain.errors import UserError

DOC_A = "the film opens in a small town .\nthe acting is wonderful and moving .\nsee it ."
DOC_B = "a dull , boring mess .\nthe plot follows two brothers ."


def _line(aid, label, evs, docids=None):
    return json.dumps({
        "annotation_id": aid, "classification": label, "query": "What is the sentiment of this review?",
        "query_type": None, "docids": docids,
        "evidences": [[{"docid": d, "text": t, "start_token": a, "end_token": b, "start_sentence": s, "end_sentence": s + 1}]
                      for d, t, a, b, s in evs],
    })


@pytest.fixture
def movies(tmp_path):
    root = tmp_path / "movies"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "posR_001.txt").write_text(DOC_A + "\n")
    (root / "docs" / "negR_002.txt").write_text(DOC_B + "\n")
    lines = [
        _line("posR_001.txt", "POS", [("posR_001.txt", "wonderful and moving", 11, 14, 1)]),
        _line("negR_002.txt", "NEG", [("negR_002.txt", "dull , boring mess", 1, 5, 0),
                                      ("negR_002.txt", "a", 0, 1, 0)]),
    ]
    for split in ("train", "val", "test"):
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_reads_official_layout(movies):
    ex = read_eraser(movies, "test")
    assert [e.annotation_id for e in ex] == ["posR_001.txt", "negR_002.txt"]
    a, b = ex
    assert a.label == 1 and b.label == 0
    assert a.words[11:14] == ["wonderful", "and", "moving"]
    assert a.evidence_tokens == {11, 12, 13}
    assert a.sentence_starts == [0, 8, 15]
    assert b.evidence_tokens == {0, 1, 2, 3, 4}
    # the parent folder works too, and --limit
    assert len(read_eraser(movies.parent, "val", limit=1)) == 1


def test_reads_docs_jsonl(movies, tmp_path):
    import shutil

    shutil.rmtree(movies / "docs")
    with open(movies / "docs.jsonl", "w") as f:
        f.write(json.dumps({"docid": "posR_001.txt", "document": DOC_A}) + "\n")
        f.write(json.dumps({"docid": "negR_002.txt", "document": DOC_B}) + "\n")
    ex = read_eraser(movies, "test")
    assert ex[0].words[11:14] == ["wonderful", "and", "moving"]


def test_malformed_line_skipped_or_strict(movies):
    path = movies / "test.jsonl"
    good = path.read_text().splitlines()
    path.write_text(good[0] + "\n{not json\n" + good[1] + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ex = read_eraser(movies, "test")
    assert len(ex) == 2
    assert any("line 2" in str(w.message) and "test.jsonl" in str(w.message) for w in caught)
    with pytest.raises(UserError, match=r"test\.jsonl, line 2: malformed JSON"):
        read_eraser(movies, "test", strict=True)


def test_evidence_out_of_range_is_one_sentence(movies):
    (movies / "test.jsonl").write_text(_line("posR_001.txt", "POS", [("posR_001.txt", "x", 10, 99, 1)]) + "\n")
    with pytest.raises(UserError) as err:
        read_eraser(movies, "test")
    msg = str(err.value)
    assert "out of range" in msg and "line 1" in msg and "18 tokens" in msg and msg.count(". ") == 0


def test_missing_document_and_bad_folder(movies, tmp_path):
    (movies / "test.jsonl").write_text(_line("posR_404.txt", "POS", [("posR_404.txt", "x", 0, 1, 0)]) + "\n")
    with pytest.raises(UserError, match="posR_404.txt' is missing"):
        read_eraser(movies, "test")
    with pytest.raises(UserError, match="does not exist"):
        read_eraser(tmp_path / "nope", "test")
    with pytest.raises(UserError, match="Unknown split"):
        read_eraser(movies, "dev")
    with pytest.raises(UserError, match="no test.jsonl"):
        (tmp_path / "empty").mkdir()
        read_eraser(tmp_path / "empty", "test")


def test_bad_label(movies):
    (movies / "test.jsonl").write_text(_line("posR_001.txt", "MAYBE", []) + "\n")
    with pytest.raises(UserError, match="neither POS nor NEG"):
        read_eraser(movies, "test")


def test_generated_reviews_deterministic_and_readable(tmp_path):
    sizes = {"train": 5, "val": 2, "test": 6}
    a = reviews.generate(tmp_path / "a", seed=3, sizes=sizes)
    b = reviews.generate(tmp_path / "b", seed=3, sizes=sizes)
    assert (a / "test.jsonl").read_bytes() == (b / "test.jsonl").read_bytes()
    assert sorted(p.name for p in (a / "docs").iterdir()) == sorted(p.name for p in (b / "docs").iterdir())
    ex = read_eraser(a, "test")
    assert len(ex) == 6
    for e in ex:
        assert 2 <= len(e.evidences) <= 3
        for ev in e.evidences:  # the evidence text is exactly the words at its offsets
            assert " ".join(e.words[ev.start_token:ev.end_token]) == ev.text
        assert len(e.evidence_tokens) < len(e.words) / 2  # evidence sits amid neutral text


def test_ensure_reviews_uses_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSEXPLAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(reviews, "SPLIT_SIZES", {"train": 3, "val": 1, "test": 2})
    root = reviews.ensure_reviews(0)
    assert root == tmp_path / "reviews-v1-seed0" / "movies"
    assert len(read_eraser(root, "test")) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["reviews-v1-seed0"]  # no temporary folder left
    assert reviews.ensure_reviews(0) == root  # second use: no regeneration


def test_hf_movie_rationales_rows_become_examples(monkeypatch):
    """The cached-dataset path: evidence strings are located in the review's whitespace tokens."""
    import datasets

    from transexplain.data.eraser import read_hf_movie_rationales

    rows = {
        "review": ["the plot is thin but the acting is superb and moving", "a dull , lifeless film"],
        "label": [1, 0],
        "evidences": [["acting is superb", "moving"], ["dull , lifeless"]],
    }
    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    examples = read_hf_movie_rationales("val")
    assert calls == [("movie_rationales", "validation")]
    assert [e.label for e in examples] == [1, 0]
    first = examples[0]
    # "acting is superb" starts at word 6 of the review, "moving" is word 10
    assert [(ev.start_token, ev.end_token) for ev in first.evidences] == [(6, 9), (10, 11)]
    assert [(ev.start_token, ev.end_token) for ev in examples[1].evidences] == [(1, 4)]
    assert len(read_hf_movie_rationales("test", limit=1)) == 1
