"""Read ERASER Movie Reviews (DeYoung et al., ACL 2020) in its official layout.

Layout: `movies/{train,val,test}.jsonl` and the documents either as `movies/docs/<docid>` (one
file per document, sentences on separate lines, tokens separated by single spaces) or as
`movies/docs.jsonl` (`{"docid", "document"}` per line). A jsonl line is
`{"annotation_id", "classification": "POS"|"NEG", "query", "query_type", "docids"?, "evidences":
[[{"docid", "text", "start_token", "end_token", "start_sentence", "end_sentence"}, ...], ...]}`,
`start_token` inclusive and `end_token` exclusive, indices into the whitespace tokens of the doc.

The Hugging Face `movie_rationales` dataset is read from the local `datasets` cache when present.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

LABELS = {"NEG": 0, "POS": 1}
SPLITS = ("train", "val", "test")


@dataclass
class Evidence:
    docid: str
    start_token: int
    end_token: int
    text: str = ""


@dataclass
class Example:
    annotation_id: str
    docid: str
    label: int  # 0 = NEG, 1 = POS
    words: list  # the whitespace tokens of the document
    evidences: list = field(default_factory=list)  # list[Evidence]
    sentence_starts: list = field(default_factory=list)

    @property
    def evidence_tokens(self) -> set:
        out = set()
        for ev in self.evidences:
            out.update(range(ev.start_token, ev.end_token))
        return out


def _unreadable(path: Path, err: Exception) -> UserError:
    """One sentence for an ERASER file that cannot be read as UTF-8 text."""
    if isinstance(err, UnicodeDecodeError):
        return UserError(f"{path} is not UTF-8 text (bad byte at offset {err.start}): the file is damaged or not "
                         f"ERASER data; download or copy the ERASER 'movies' folder again.")
    if isinstance(err, IsADirectoryError):
        return UserError(f"{path} is a folder, not a file: give the ERASER 'movies' folder as distributed.")
    reason = (getattr(err, "strerror", None) or type(err).__name__).lower()
    return UserError(f"Cannot read {path} ({reason}): make it readable or give another data folder.")


def _read_jsonl(path: Path, strict: bool) -> list:
    try:
        return _read_jsonl_lines(path, strict)
    except (OSError, UnicodeDecodeError) as err:
        raise _unreadable(path, err) from None


def _read_jsonl_lines(path: Path, strict: bool) -> list:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not a JSON object")
            except ValueError as err:
                msg = f"{path}, line {lineno}: malformed JSON line ({err})"
                if strict:
                    raise UserError(f"{msg}: fix the line or run without --strict to skip it.") from None
                warnings.warn(f"{msg}; skipped.", stacklevel=2)
                continue
            rows.append((lineno, obj))
    return rows


class _Docs:
    """Documents by docid, from `docs/` files or `docs.jsonl`."""

    def __init__(self, root: Path, strict: bool):
        self.root = root
        self.dir = root / "docs"
        self.cache: dict[str, str] = {}
        jsonl = root / "docs.jsonl"
        if not self.dir.is_dir() and jsonl.exists():
            for _, obj in _read_jsonl(jsonl, strict):
                if "docid" in obj and "document" in obj:
                    self.cache[obj["docid"]] = obj["document"]
        elif not self.dir.is_dir():
            raise UserError(f"{root} has neither a docs/ folder nor docs.jsonl: give the ERASER 'movies' folder.")

    def get(self, docid: str, where: str) -> str:
        if docid in self.cache:
            return self.cache[docid]
        path = self.dir / docid
        if self.dir.is_dir() and path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                raise _unreadable(path, err) from None
            self.cache[docid] = text
            return text
        raise UserError(f"{where}: the document {docid!r} is missing from {self.root}/docs: check the data folder.")


def _parse(obj: dict, docs: _Docs, where: str) -> Example:
    for key in ("annotation_id", "classification", "evidences"):
        if key not in obj:
            raise UserError(f"{where}: the line has no {key!r} field, which the ERASER format requires.")
    label = str(obj["classification"]).upper()
    if label not in LABELS:
        raise UserError(f"{where}: classification {obj['classification']!r} is neither POS nor NEG.")
    groups = obj["evidences"] or []
    docids = obj.get("docids") or []
    docid = docids[0] if docids else None
    if docid is None:
        for group in groups:
            for ev in group:
                docid = ev.get("docid")
                break
            if docid:
                break
    docid = docid or obj["annotation_id"]
    text = docs.get(docid, where)
    lines = [ln for ln in text.split("\n") if ln.strip()]
    words, starts = [], []
    for ln in lines:
        starts.append(len(words))
        words.extend(ln.split())
    evidences = []
    for group in groups:
        for ev in group:
            a, b = int(ev["start_token"]), int(ev["end_token"])
            ev_doc = ev.get("docid", docid)
            if ev_doc != docid:
                continue
            if not (0 <= a < b <= len(words)):
                raise UserError(
                    f"{where}: evidence tokens {a}..{b} are out of range for document {docid!r}, which has {len(words)} tokens."
                )
            evidences.append(Evidence(docid=docid, start_token=a, end_token=b, text=ev.get("text", "")))
    return Example(annotation_id=obj["annotation_id"], docid=docid, label=LABELS[label], words=words,
                   evidences=evidences, sentence_starts=starts)


def read_eraser(root, split: str = "test", strict: bool = False, limit: int | None = None) -> list:
    """Examples of one split from an ERASER `movies` folder (or a folder holding `movies/`)."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"The data folder {root} does not exist: give the ERASER 'movies' folder.")
    if split not in SPLITS:
        raise UserError(f"Unknown split {split!r}: choose one of {', '.join(SPLITS)}.")
    if not (root / f"{split}.jsonl").exists() and (root / "movies" / f"{split}.jsonl").exists():
        root = root / "movies"
    path = root / f"{split}.jsonl"
    if not path.exists():
        raise UserError(f"{root} has no {split}.jsonl: give the ERASER 'movies' folder (with train/val/test.jsonl and docs/).")
    docs = _Docs(root, strict)
    out = []
    for lineno, obj in _read_jsonl(path, strict):
        out.append(_parse(obj, docs, f"{path}, line {lineno}"))
        if limit is not None and len(out) >= limit:
            break
    return out


def read_hf_movie_rationales(split: str = "test", limit: int | None = None) -> list:
    """The `movie_rationales` dataset from the local Hugging Face cache (no download).

    Its rows carry the review text and the evidence *strings*; each evidence is located in the
    review's whitespace tokens by its first exact occurrence.
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets

        ds = datasets.load_dataset("movie_rationales", split={"val": "validation"}.get(split, split))
    except Exception as err:  # not in the cache, or no datasets
        raise UserError(f"The movie_rationales dataset is not in the local Hugging Face cache ({type(err).__name__}): give --data with the ERASER 'movies' folder.") from None
    out = []
    for i, row in enumerate(ds):
        words = row["review"].split()
        evidences = []
        for ev in row.get("evidences") or []:
            ev_words = ev.split()
            for a in range(len(words) - len(ev_words) + 1):
                if words[a:a + len(ev_words)] == ev_words:
                    evidences.append(Evidence(f"hf_{split}_{i}", a, a + len(ev_words), ev))
                    break
        out.append(Example(annotation_id=f"hf_{split}_{i}", docid=f"hf_{split}_{i}", label=int(row["label"]),
                           words=words, evidences=evidences))
        if limit is not None and len(out) >= limit:
            break
    return out
