"""Text commands: `tx-bench eraser` and the `explain --text` back end (`explain_text`)."""
from __future__ import annotations

import html as html_lib
from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .common import (Device, Method, MethodOptions, Overwrite, Precision, limit_option, method_options, model_option,
                     out_option, resolve_methods)

#: background colours of the terminal (xterm-256), from no relevance to the most relevant word
_ANSI_SHADES = (231, 194, 157, 120, 83, 46)
EraserModel = model_option("'embedded', or a local Hugging Face model folder.")
EraserLimit = limit_option("Only the first N documents.")
EraserOut = out_option("eraser", "; resumed if it exists")


def _load_examples(data: Optional[str], split: str, limit: Optional[int], strict: bool, quiet: bool):
    from ..data.eraser import read_eraser, read_hf_movie_rationales

    if data is None:
        from ..data.reviews import ensure_reviews

        root = ensure_reviews(0)
        # said even with --quiet: these numbers are not ERASER's
        typer.echo(f"No --data given: running on the embedded generated reviews ({root}), not on ERASER Movie Reviews.")
        return read_eraser(root, split, strict=strict, limit=limit), f"embedded:reviews-v1-seed0/{split}"
    if data in ("hf", "movie_rationales", "hf:movie_rationales"):
        return read_hf_movie_rationales(split, limit=limit), f"hf:movie_rationales/{split}"
    return read_eraser(Path(data), split, strict=strict, limit=limit), f"{Path(data).resolve()}/{split}"


def model_classes(spec: str):
    """(id2label, num_labels) of a text model from its config file alone (no weights read), or None
    when it cannot be told that way: the label check then waits for the loaded model."""
    import json

    from ..models.text import EMBEDDED_DIR

    path = EMBEDDED_DIR / "config.json" if spec in (None, "", "embedded") else Path(spec) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    names = cfg.get("id2label") or ({0: "NEG", 1: "POS"} if path.parent == EMBEDDED_DIR else {})
    return {int(k): v for k, v in names.items()}, int(cfg.get("num_labels") or len(names) or 2)


def check_labels(examples, spec: str, data_desc: str):
    """Refuse, before the model's weights are read, a model whose classes do not fit the data."""
    from ..data.eraser import align_labels

    known = model_classes(spec)
    if known is not None:
        align_labels(examples, known[0], known[1], data_desc)


def _say_where_resumed(out: Path, overwrite: bool, methods: list, total: int):
    """"Resuming <out> at document N of M." when an unfinished results file is picked up (N: the
    first unfinished method's documents done; read without a lock, before the run takes it)."""
    if overwrite or not Path(out).exists():
        return
    from ..errors import UserError as _UserError
    from ..results.store import ResultStore
    from ..results.tables import resuming_line

    try:
        store = ResultStore(out)
        if store.is_complete:
            return
        done = {m: store.done(m) for m in methods}
    except (_UserError, OSError):
        return  # the run's own open says what is wrong with the file
    pending = [m for m in methods if done[m] < total]
    if pending and any(done.values()):
        typer.echo(resuming_line(out, done[pending[0]], total, "documents")[:-1] + f" ({pending[0]}).")


def register(app: typer.Typer):
    @app.command("eraser")
    def eraser_cmd(
        method: Method,
        data: Optional[str] = typer.Option(None, "--data", help="An ERASER dataset folder (movies, e-SNLI, BoolQ, FEVER, MultiRC, CoS-E, Evidence Inference), or 'hf' for the cached movie_rationales; default: the embedded reviews."),
        model: EraserModel = "embedded",
        split: str = typer.Option("test", "--split", help="train, val or test."),
        limit: EraserLimit = None,
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="Documents per batch."),
        out: EraserOut = None,
        overwrite: Overwrite = False,
        strict: bool = typer.Option(False, "--strict", help="Stop at a malformed jsonl line instead of skipping it."),
        # plural on purpose: one bar per method (the image benchmarks show one bar for all)
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
        no_faithfulness: bool = typer.Option(False, "--no-faithfulness", help="Skip comprehensiveness / sufficiency (no extra forwards)."),
        precision: Precision = "float64",
        device: Device = "cpu",
        option: MethodOptions = None,
    ):
        """ERASER Movie Reviews: token-F1 of the top-k words (and IOU-F1, AUPRC, comprehensiveness, sufficiency)."""
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}.")
        from ..precision import check_precision

        from .vision import check_device

        precision = check_precision(precision)
        device = check_device(device)
        methods = resolve_methods(method)  # names checked before the data and model are read
        method_options(option, methods)  # a bad --option is refused before the data and the model are read
        examples, data_desc = _load_examples(data, split, limit, strict, quiet)
        if not examples:
            raise UserError(f"No documents in the {split} split of {data_desc}.")
        import torch

        from ..evaluation.eraser import run_eraser
        from ..models.text import load_text_model

        check_labels(examples, model, data_desc)
        torch.manual_seed(0)
        mdl, tok = load_text_model(model)
        from ..models.text import TextAdapter

        from ..data.eraser import align_labels

        align_labels(examples, getattr(mdl.config, "id2label", None), int(mdl.config.num_labels), data_desc)
        methods = resolve_methods(method, TextAdapter(mdl))
        options = method_options(option, methods)
        # the `--option` settings, only when given (so the files of runs without them keep their settings)
        config = {**({"method_options": options} if options else {}), "methods": methods, "model": model,
                  "data": data_desc, "split": split, "limit": limit,
                  "documents": len(examples), "faithfulness": not no_faithfulness, "version": "eraser-v1",
                  "precision": precision}
        out = out or Path("results") / f"eraser_{'all' if method == 'all' else '+'.join(methods)}.h5"
        from ..results.paths import check_output_path
        from ..results.tables import header_line

        check_output_path(out)
        typer.echo(header_line({**config, "benchmark": "eraser"}, len(examples), "documents"))
        _say_where_resumed(out, overwrite, methods, len(examples))
        sums = run_eraser(examples, mdl, tok, methods, out, config, batch_size=batch_size, overwrite=overwrite,
                          quiet=quiet, faithfulness=not no_faithfulness, precision=precision, device=device,
                          method_options=options)
        if sums is None:  # a torchrun rank other than 0: rank 0 merged the shards and reports
            return
        from .vision import eraser_report

        typer.echo(eraser_report(out, "markdown"))  # the table `tx-bench report` prints, as perturb and segment do
        first = next(iter(sums.values()))
        if first.get("evidence_tokens_cut"):
            typer.echo(f"{first['documents_truncated']} documents were truncated to the model's maximum length; "
                       f"{first['evidence_tokens_cut']} evidence tokens were cut off.")
        typer.echo(f"Results written to {out}")


def word_relevance(text: str, model_spec: str = "embedded", method: str = "transformer_attribution", target=None,
                   precision: str = "float64", options: dict | None = None):
    """(words, word scores normalised to [0, 1], predicted label, explained label, probabilities);
    computed in `precision` (float64 by default, or float32); options: the method's options
    (`explain(..., **options)`)."""
    import numpy as np

    from ..api import explain
    from ..evaluation.eraser import word_scores
    from ..models.text import TextAdapter, load_text_model

    words = text.split()
    if not words:
        raise UserError("The text to explain is empty: give some words with --text.")
    model, tok = load_text_model(model_spec)
    adapter = TextAdapter(model, tok)
    max_len = min(adapter.max_length, 512)
    enc = tok([words], is_split_into_words=True, truncation=True, max_length=max_len, return_tensors="pt",
              return_special_tokens_mask=True)
    x = adapter.prepare(enc)
    if target is not None and not 0 <= int(target) < adapter.num_classes:
        raise UserError(f"Target class {target} is out of range: the model has {adapter.num_classes} classes (0..{adapter.num_classes - 1}).")
    import torch

    expl = explain(adapter, x, method=method, target=None if target is None else torch.tensor([int(target)]),
                   precision=precision, **(options or {}))
    ws = word_scores(expl.token_map[0].double().numpy(), x.word_ids[0], x.special_mask[0].numpy(), len(words))
    ws = np.where(np.isfinite(ws), ws, 0.0)
    top = ws.max()
    norm = ws / top if top > 0 else np.zeros_like(ws)
    names = getattr(model.config, "id2label", None) or {}
    probs = expl.logits[0].double().softmax(-1).tolist()
    pred = int(expl.logits[0].argmax())
    return words, norm, names.get(pred, str(pred)), names.get(int(expl.target[0]), str(int(expl.target[0]))), probs


def explain_text(text: str, model: str = "embedded", method: str = "transformer_attribution", target=None, html=None,
                 precision: str = "float64", options=None):
    """Print the words coloured by relevance (ANSI background) and the predicted class; --html writes a page.

    Colours are used on a terminal or with FORCE_COLOR set (never with NO_COLOR); otherwise each word
    is followed by its score in brackets. Scores are word relevances divided by the largest one.
    options: the `--option` pairs (`commands.common.method_options`), refused before the model loads.
    """
    from ..explainers import get_method

    name = get_method(method).name
    per_method = method_options(options, [name])
    words, scores, pred, explained, probs = word_relevance(text, model or "embedded", method, target, precision,
                                                           per_method.get(name))
    import os
    import sys

    colour = sys.stdout.isatty() or bool(os.environ.get("FORCE_COLOR"))
    if os.environ.get("NO_COLOR"):
        colour = False
    parts = []
    for w, s in zip(words, scores):
        if colour:
            shade = _ANSI_SHADES[min(len(_ANSI_SHADES) - 1, int(round(float(s) * (len(_ANSI_SHADES) - 1))))]
            parts.append(f"\x1b[48;5;{shade}m\x1b[38;5;16m{w}\x1b[0m")
        else:  # not a terminal: the scores in brackets instead of colours
            parts.append(f"{w}[{float(s):.2f}]")
    typer.echo(" ".join(parts), color=colour)
    p = max(probs)
    typer.echo(f"predicted class: {pred} (p={p:.3f}); explained class: {explained}; method: {method}")
    if html is not None:
        spans = " ".join(
            f'<span style="background: rgba(0, 170, 0, {float(s):.3f})" title="{float(s):.3f}">{html_lib.escape(w)}</span>'
            for w, s in zip(words, scores))
        page = (
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>transexplain: text explanation</title></head>\n"
            f"<body style=\"font-family: sans-serif; line-height: 1.8; max-width: 50em\">\n<p>{spans}</p>\n"
            f"<p>predicted class: <b>{html_lib.escape(pred)}</b> (p={p:.3f}); explained class: "
            f"{html_lib.escape(explained)}; method: {html_lib.escape(method)}</p>\n</body></html>\n")
        Path(html).parent.mkdir(parents=True, exist_ok=True)
        Path(html).write_text(page, encoding="utf-8")
        typer.echo(f"wrote {html}")
