"""The embedded movie-review data set: generated, deterministic, written in the ERASER layout.

Each review mixes neutral plot sentences with two or three *evidence* phrases that decide the label
(about the film itself) and at most one *distractor* sentence of the opposite polarity about
something that is not the film (the popcorn, the drive home). The evidence phrases are the human
rationales of the ERASER format, so token-F1 measures whether an explanation finds them.

The files are generated on first use into `$TRANSEXPLAIN_CACHE/reviews-v1-seed0` (default
`~/.cache/transexplain/reviews-v1-seed0`), written to a temporary directory and renamed into place,
so two processes never see a half-written data set. The same seed always gives the same bytes.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

VERSION = "v1"
SPLIT_SIZES = {"train": 800, "val": 100, "test": 200}
QUERY = "What is the sentiment of this review?"

_NAMES = ["anna", "marcus", "the detective", "a young nurse", "two brothers", "the old captain", "a farmer",
          "the mayor", "a retired teacher", "the new neighbour", "a pianist", "the twins"]
_PLACES = ["a small town", "the city", "a remote island", "an old hotel", "the desert", "a space station",
           "a fishing village", "the suburbs", "a boarding school", "the mountains"]
_GOALS = ["find a missing letter", "win back a lost fortune", "solve a strange murder", "rebuild the family farm",
          "escape from an old debt", "return home before winter", "open a small restaurant", "protect a secret"]
_PLOT = [
    "the story follows {who} who lives in {where} .",
    "{who} travels to {where} to {goal} .",
    "along the way {who} meets {who2} , who also wants to {goal} .",
    "the film runs about two hours and was shot in {where} .",
    "most of the action takes place in {where} during one long summer .",
    "{who2} arrives halfway through and changes the plan .",
    "the second half moves the story to {where} .",
    "it is based on a novel that came out ten years ago .",
    "the director also wrote the script with {who2} in mind .",
    "in the end {who} has to decide whether to {goal} .",
    "there is a subplot about {who2} and a letter from {where} .",
    "the film opens with a long shot of {where} at night .",
]
# evidence: (prefix, rationale, suffix); the rationale words are the evidence span
_POS = [
    ("the acting is", "wonderful and deeply moving", "."),
    ("", "i loved every minute of this film", "."),
    ("the script is", "smart , funny and beautifully written", "."),
    ("", "a brilliant and heartfelt movie", "that stays with you ."),
    ("the lead gives", "a superb performance", "throughout ."),
    ("", "this is easily the best film of the year", "."),
    ("the photography is", "gorgeous and the score is excellent", "."),
    ("", "a delightful , charming and touching story", "."),
    ("", "highly recommended", "for anyone who loves cinema ."),
    ("the ending is", "powerful and perfectly earned", "."),
]
_NEG = [
    ("the acting is", "wooden and painfully dull", "."),
    ("", "i hated almost every minute of this film", "."),
    ("the script is", "lazy , clumsy and badly written", "."),
    ("", "a boring and pointless movie", "that drags on forever ."),
    ("the lead gives", "an awful performance", "throughout ."),
    ("", "this is easily the worst film of the year", "."),
    ("the photography is", "ugly and the score is annoying", "."),
    ("", "a tedious , messy and forgettable story", "."),
    ("", "avoid this mess", "at all costs ."),
    ("the ending is", "stupid and completely unearned", "."),
]
_DISTRACT_POS = ["the popcorn at the cinema was great .", "the drive home afterwards was lovely .",
                 "my friend had a nice time at dinner before the show ."]
_DISTRACT_NEG = ["the popcorn at the cinema was terrible .", "the traffic on the way there was awful .",
                 "the seats in the theater were uncomfortable ."]


def cache_root() -> Path:
    base = os.environ.get("TRANSEXPLAIN_CACHE")
    return Path(base) if base else Path.home() / ".cache" / "transexplain"


def _review(rng: random.Random, positive: bool):
    """One review: a list of sentences (each a list of words) and the evidence spans."""
    sentences: list[list[str]] = []
    spans: list[tuple[int, int, int]] = []  # (sentence index, start word in sentence, end word)

    def plot():
        t = rng.choice(_PLOT)
        return t.format(who=rng.choice(_NAMES), who2=rng.choice(_NAMES), where=rng.choice(_PLACES),
                        goal=rng.choice(_GOALS)).split()

    n_plot = rng.randint(4, 8)
    n_evidence = rng.randint(2, 3)
    n_distract = rng.randint(0, 1)
    kinds = ["plot"] * n_plot + ["evidence"] * n_evidence + ["distract"] * n_distract
    rng.shuffle(kinds)
    kinds = ["plot"] + kinds  # a review never opens with its verdict
    pool = list(_POS if positive else _NEG)
    rng.shuffle(pool)
    for kind in kinds:
        if kind == "plot":
            sentences.append(plot())
        elif kind == "distract":
            sentences.append(rng.choice(_DISTRACT_NEG if positive else _DISTRACT_POS).split())
        else:
            pre, rat, post = pool.pop()
            pre_w, rat_w, post_w = pre.split(), rat.split(), post.split()
            spans.append((len(sentences), len(pre_w), len(pre_w) + len(rat_w)))
            sentences.append(pre_w + rat_w + post_w)
    return sentences, spans


def generate(root: Path, seed: int = 0, sizes: dict | None = None) -> Path:
    """Write the data set in the official ERASER layout under `root/movies` and return that folder."""
    sizes = sizes or SPLIT_SIZES
    rng = random.Random(seed)
    movies = Path(root) / "movies"
    (movies / "docs").mkdir(parents=True, exist_ok=True)
    docs_jsonl = []
    for split, n in sizes.items():
        lines = []
        for i in range(n):
            positive = rng.random() < 0.5
            sentences, spans = _review(rng, positive)
            docid = f"{'pos' if positive else 'neg'}G_{split}_{i:04d}.txt"
            text = "\n".join(" ".join(s) for s in sentences)
            (movies / "docs" / docid).write_text(text + "\n", encoding="utf-8")
            docs_jsonl.append({"docid": docid, "document": text})
            offsets, at = [], 0
            for s in sentences:
                offsets.append(at)
                at += len(s)
            evidences = []
            for si, a, b in spans:
                evidences.append([{
                    "docid": docid, "text": " ".join(sentences[si][a:b]),
                    "start_token": offsets[si] + a, "end_token": offsets[si] + b,
                    "start_sentence": si, "end_sentence": si + 1,
                }])
            lines.append(json.dumps({
                "annotation_id": docid, "classification": "POS" if positive else "NEG", "query": QUERY,
                "query_type": None, "docids": None, "evidences": evidences,
            }))
        (movies / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(movies / "docs.jsonl", "w", encoding="utf-8") as f:
        for d in docs_jsonl:
            f.write(json.dumps(d) + "\n")
    return movies


def ensure_reviews(seed: int = 0) -> Path:
    """The embedded data set's `movies` folder, generated (atomically) on first use."""
    final = cache_root() / f"reviews-{VERSION}-seed{seed}"
    if (final / "movies" / "test.jsonl").exists():
        return final / "movies"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".reviews-{VERSION}-seed{seed}-", dir=final.parent))
    try:
        generate(tmp, seed)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "movies" / "test.jsonl").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final / "movies"
