"""Read the ERASER datasets (DeYoung et al., ACL 2020) in their official layout.

Layout: `<dataset>/{train,val,test}.jsonl` and the documents either as `<dataset>/docs/<docid>` (one
file per document, sentences on separate lines, tokens separated by single spaces) or as
`<dataset>/docs.jsonl` (`{"docid", "document"}` per line). A jsonl line is
`{"annotation_id", "classification", "query", "query_type", "docids"?, "evidences":
[[{"docid", "text", "start_token", "end_token", "start_sentence", "end_sentence"}, ...], ...]}`,
`start_token` inclusive and `end_token` exclusive, indices into the whitespace tokens of the doc.

Every ERASER dataset of that format is read: Movie Reviews (no informative query), BoolQ, FEVER,
MultiRC, CoS-E and Evidence Inference (a query -- the question, claim, question || answer, or
intervention || comparator || outcome -- and one document), and e-SNLI (two documents,
`<id>_premise` and `<id>_hypothesis`, evidence in either). What the model reads (`Example`):
- one document and a query that differs between the lines of the split: the pair
  `[CLS] query [SEP] document [SEP]` (ERASER's own BERT pipeline puts the query first), the
  document truncated to the window; the query's tokens get no rationale and are never ranked;
- several documents (e-SNLI): the pair `[CLS] premise [SEP] hypothesis [SEP]`; `words` is the
  premise's words then the hypothesis's, and the evidence spans are moved into that joint index
  space; e-SNLI's query (the same question on every line) is not encoded;
- one document and the same query on every line (Movie Reviews' "What is the sentiment of this
  review?"): the document alone, as before.
`label` is the class's index in the dataset's class order (`CLASS_ORDER`: ERASER's own order where
its pipeline gives one, else the sorted classifications of the split); `align_labels` maps it onto a
model's classes by name. A folder named like an ERASER dataset (`movies`, `esnli`, `boolq`, `fever`,
`multirc`) must hold that dataset's classifications.

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
#: the class order of each ERASER dataset (the `classes` of ERASER's params/<dataset>_bert.json; e-SNLI's
#: from the e-SNLI release), used for a model whose classes are not named (LABEL_0, LABEL_1, ...)
CLASS_ORDER = {
    "movies": ("NEG", "POS"),
    "boolq": ("False", "True"),
    "multirc": ("False", "True"),
    "fever": ("SUPPORTS", "REFUTES"),
    "evidence_inference": ("significantly decreased", "no significant difference", "significantly increased"),
    "esnli": ("entailment", "neutral", "contradiction"),
}
#: folder names that identify a dataset (whose lines must carry its classifications)
_FOLDER_DATASET = {"movies": "movies", "boolq": "boolq", "multirc": "multirc", "fever": "fever", "esnli": "esnli",
                   "e-snli": "esnli", "evidence_inference": "evidence_inference"}


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
    label: int  # the class's index in the dataset's class order (Movie Reviews: 0 = NEG, 1 = POS)
    words: list  # the whitespace tokens of the document (e-SNLI: the premise's, then the hypothesis's)
    evidences: list = field(default_factory=list)  # list[Evidence], spans in the index space of `words`
    sentence_starts: list = field(default_factory=list)
    classification: str = ""  # the label as the data names it
    query: list = field(default_factory=list)  # words of the query the model reads first ([] : none)
    split_at: int | None = None  # e-SNLI: words[:split_at] is the first sequence, the rest the second
    classes: tuple = ()  # the dataset's class order (`label` indexes it)

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

    def has(self, docid: str) -> bool:
        return docid in self.cache or (self.dir.is_dir() and (self.dir / docid).is_file())

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


def _doc_words(docs: "_Docs", docid: str, where: str) -> tuple:
    """(words, sentence starts) of one document: its non-empty lines, split on whitespace."""
    words, starts = [], []
    for ln in docs.get(docid, where).split("\n"):
        if ln.strip():
            starts.append(len(words))
            words.extend(ln.split())
    return words, starts


def _docids(obj: dict, docs: "_Docs") -> list:
    """The documents an annotation reads, in reading order: `docids` (or, without it, the documents its
    evidences name, in order of appearance); e-SNLI's `<id>_premise` before `<id>_hypothesis` (the
    other one of the two is added when the line names only one and the docs hold both)."""
    ids = [str(d) for d in (obj.get("docids") or [])]
    if not ids:
        for group in obj.get("evidences") or []:
            for ev in group:
                if ev.get("docid") is not None and str(ev["docid"]) not in ids:
                    ids.append(str(ev["docid"]))
    for d in list(ids):
        for mine, other in (("_premise", "_hypothesis"), ("_hypothesis", "_premise")):
            if d.endswith(mine) and d[: -len(mine)] + other not in ids and docs.has(d[: -len(mine)] + other):
                ids.append(d[: -len(mine)] + other)
    ids.sort(key=lambda d: 0 if d.endswith("_premise") else 1 if d.endswith("_hypothesis") else 0)  # stable
    return ids or [str(obj["annotation_id"])]


def _check_label(label: str, dataset: str | None, where: str):
    if dataset is None or dataset not in CLASS_ORDER:
        return
    allowed = CLASS_ORDER[dataset]
    if label.lower() not in {c.lower() for c in allowed}:
        if dataset == "movies":
            raise UserError(f"{where}: classification {label!r} is neither POS nor NEG.")
        raise UserError(f"{where}: classification {label!r} is not one of {dataset}'s classes ({', '.join(allowed)}).")


def _parse(obj: dict, docs: "_Docs", where: str, classes: list | None = None, dataset: str | None = None,
           use_query: bool = False) -> Example:
    for key in ("annotation_id", "classification", "evidences"):
        if key not in obj:
            raise UserError(f"{where}: the line has no {key!r} field, which the ERASER format requires.")
    label = str(obj["classification"])
    _check_label(label, dataset, where)
    classes = list(classes) if classes else sorted(LABELS)
    index = {c.lower(): i for i, c in enumerate(classes)}
    if label.lower() not in index:
        raise UserError(f"{where}: classification {label!r} is not among the data's classes ({', '.join(classes)}).")
    ids = _docids(obj, docs)
    words, starts, offsets, lengths = [], [], {}, {}
    for d in ids:
        w, st = _doc_words(docs, d, where)
        offsets[d], lengths[d] = len(words), len(w)
        starts.extend(len(words) + s for s in st)
        words.extend(w)
    evidences = []
    for group in obj["evidences"] or []:
        for ev in group:
            a, b = int(ev["start_token"]), int(ev["end_token"])
            ev_doc = str(ev.get("docid", ids[0]))
            if ev_doc not in offsets:
                continue
            if not (0 <= a < b <= lengths[ev_doc]):
                raise UserError(
                    f"{where}: evidence tokens {a}..{b} are out of range for document {ev_doc!r}, which has {lengths[ev_doc]} tokens."
                )
            off = offsets[ev_doc]
            evidences.append(Evidence(docid=ev_doc, start_token=a + off, end_token=b + off, text=ev.get("text", "")))
    query = str(obj.get("query") or "").split() if use_query and len(ids) == 1 else []
    return Example(annotation_id=obj["annotation_id"], docid=ids[0], label=index[label.lower()], words=words,
                   evidences=evidences, sentence_starts=starts, classification=classes[index[label.lower()]],
                   query=query, split_at=offsets[ids[1]] if len(ids) == 2 else None, classes=tuple(classes))


#: datasets whose query always carries information (encoded even when a split has one line)
_QUERY_DATASETS = ("boolq", "fever", "multirc", "cose", "evidence_inference")


def dataset_classes(rows: list, dataset: str | None) -> list:
    """The class order of a split: the dataset's own (`CLASS_ORDER`) when its classifications fit it,
    else the sorted distinct classifications."""
    seen = {str(obj.get("classification")) for _, obj in rows if "classification" in obj}
    lowered = {c.lower() for c in seen}
    for name, order in CLASS_ORDER.items():
        if (dataset in (None, name)) and lowered and lowered <= {c.lower() for c in order}:
            return list(order)
    return sorted(seen)


def read_eraser(root, split: str = "test", strict: bool = False, limit: int | None = None) -> list:
    """Examples of one split from an ERASER dataset folder (or a folder holding `movies/`)."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"The data folder {root} does not exist: give an ERASER dataset folder (e.g. 'movies').")
    if split not in SPLITS:
        raise UserError(f"Unknown split {split!r}: choose one of {', '.join(SPLITS)}.")
    if not (root / f"{split}.jsonl").exists() and (root / "movies" / f"{split}.jsonl").exists():
        root = root / "movies"
    path = root / f"{split}.jsonl"
    if not path.exists():
        raise UserError(f"{root} has no {split}.jsonl: give an ERASER dataset folder (with train/val/test.jsonl and docs/).")
    docs = _Docs(root, strict)
    dataset = _FOLDER_DATASET.get(root.name.lower())
    rows = _read_jsonl(path, strict)
    classes = dataset_classes(rows, dataset)
    queries = {str(obj.get("query") or "") for _, obj in rows}
    use_query = dataset in _QUERY_DATASETS or (dataset != "movies" and len(queries) > 1)
    out = []
    for lineno, obj in rows:
        out.append(_parse(obj, docs, f"{path}, line {lineno}", classes, dataset, use_query))
        if limit is not None and len(out) >= limit:
            break
    return out


def align_labels(examples: list, id2label: dict | None, num_labels: int, data: str = "the data") -> list:
    """Set each example's `label` to the model's class of the same name (case-insensitive).

    A model whose classes are not named (`LABEL_0`, ... or numbers) takes the dataset's class order
    (`CLASS_ORDER`, or the order the reader gave) when it has as many classes. Anything else -- a
    class of the data the model does not name, or another number of classes -- is refused in one
    sentence before any work.
    """
    names = {int(k): str(v) for k, v in (id2label or {}).items()}
    wanted = []
    for e in examples:
        if e.classification and e.classification not in wanted:
            wanted.append(e.classification)
    if not wanted:
        return examples
    generic = not names or all(v.upper() in (f"LABEL_{k}", str(k)) for k, v in names.items())
    if generic:
        count = max([len(e.classes) for e in examples] + [max(e.label for e in examples) + 1])
        if count == num_labels:
            return examples
        raise UserError(f"The model has {num_labels} unnamed classes but {data} has the classes "
                        f"{', '.join(wanted)}: give a model trained on this data set.")
    by_name = {v.lower(): k for k, v in names.items()}
    missing = [c for c in wanted if c.lower() not in by_name]
    if missing:
        raise UserError(f"The model's classes ({', '.join(names[k] for k in sorted(names))}) do not include "
                        f"{', '.join(missing)}, a class of {data}: give a model trained on this data set "
                        f"(its config's id2label names the classes).")
    for e in examples:
        e.label = by_name[e.classification.lower()]
    return examples


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
                           words=words, evidences=evidences, classification=("NEG", "POS")[int(row["label"])],
                           classes=("NEG", "POS")))
        if limit is not None and len(out) >= limit:
            break
    return out
