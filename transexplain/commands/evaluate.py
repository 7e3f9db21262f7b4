"""`tx-bench evaluate`: the metric suite (faithfulness, localisation, sanity) side by side."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from .common import (DEFAULT_PROMPT, Classes, Device, Labels, Limit, Method, MethodOptions, NumWorkers, Overwrite,
                     Precision, Prompt, Quiet, RandomWeights, method_options, model_option, out_option, split_classes)

#: model specs that name a text classifier (run by `evaluation.text_suite`)
TEXT_MODELS = ("embedded-text",)


def _is_text_model(spec: str) -> bool:
    """'embedded-text', a BERT-family name, or a local Hugging Face folder of a sequence classifier."""
    import json

    s = spec.lower()
    if s in TEXT_MODELS or "bert" in s:
        return True
    cfg = Path(spec) / "config.json"
    if cfg.is_file():
        try:
            archs = json.loads(cfg.read_text()).get("architectures") or []
        except (OSError, ValueError):
            return False
        return any(str(a).endswith("ForSequenceClassification") for a in archs)
    return False


def _evaluate_text(method, metric, data, labels, model, split, limit, batch_size, device, precision, random_weights,
                   classes, out, overwrite, fmt, quiet, option=None):
    """`evaluate` on a text classifier: ERASER data (the embedded reviews by default), `text_suite`;
    option: the `--option` pairs, checked (`method_options`) before the data and the model are read."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..data.eraser import align_labels
    from ..evaluation.sharding import open_results
    from ..evaluation.text_suite import TEXT_OPTIONS, run_text_suite, text_metrics
    from ..models.text import TextAdapter, load_text_model
    from ..precision import check_precision
    from ..results.environment import collect_environment
    from ..results.paths import check_output_path
    from ..results.suite_report import suite_report_text
    from ..results.tables import header_line
    from .common import resolve_methods
    from .text import _load_examples, check_labels
    from .vision import sharded

    metrics = text_metrics(metric)  # refusals first, before any work
    for flag, given in (("--labels", labels is not None), ("--random-weights", random_weights),
                        ("--classes", classes is not None)):
        if given:
            raise UserError(f"{flag} is for image models: drop it with a text model.")
    if split not in ("train", "val", "test"):
        raise UserError(f"Unknown --split {split!r}: choose train, val or test.")
    precision = check_precision(precision)
    if precision not in ("float64", "float32"):
        raise UserError(f"--precision {precision} is not offered for text: choose float64 or float32.")
    method_options(option, resolve_methods(method))  # the names and options, before the data and the model are read
    shard, device = sharded(device, batch_size)
    spec = "embedded" if model.lower() == "embedded-text" else model
    examples, data_desc = _load_examples(None if data is None else str(data), split, limit, False, quiet)
    if not examples:
        raise UserError(f"No documents in the {split} split of {data_desc}.")
    check_labels(examples, spec, data_desc)  # before the weights are read
    import torch

    torch.manual_seed(0)
    mdl, tok = load_text_model(spec)
    align_labels(examples, getattr(mdl.config, "id2label", None), int(mdl.config.num_labels), data_desc)
    methods = resolve_methods(method, TextAdapter(mdl))
    options = method_options(option, methods)
    import transexplain

    # the `--option` settings, only when given (as the image runners record them)
    config = {**({"method_options": options} if options else {}), "benchmark": "suite", "modality": "text",
              "methods": methods, "metrics": metrics, "model": model,
              "model_source": spec, "weights": spec if spec != "embedded" else "embedded", "data": data_desc,
              "data_source": "embedded" if data is None else "user", "split": split, "limit": limit,
              "documents": len(examples), "precision": precision, "batch_size": batch_size,
              "version": transexplain.__version__, "protocol": TEXT_OPTIONS}
    out = out or Path("results") / f"evaluate_text_{'all' if method == 'all' else '+'.join(methods)}.h5"
    check_output_path(out)
    typer.echo(header_line(config, len(examples), "documents"))
    main = False
    with open_results(out, config, overwrite, lambda store: run_text_suite(
            examples, mdl, tok, store, methods, metrics, batch_size=batch_size, device=device, quiet=quiet,
            precision=precision, shard=shard, method_options=options),
            shard=shard, device=device, say=typer.echo, total=len(examples), unit="documents",
            environment=collect_environment(precision, device)) as store:
        if store is not None:
            main = True
            store.mark_complete()
    if not main:
        return
    typer.echo(suite_report_text(out, fmt))
    typer.echo(f"Results written to {out}")


def _open_data(data: Path | None, labels: Path | None, loaded, metrics):
    """(dataset, path, source, has_masks): a gtsegs-format .mat (images and masks) or an image folder."""
    from ..data.imagenet import ImageFolderDataset, Preprocess
    from ..evaluation.segmentation import SegmentationData
    from ..models import as_adapter
    from .vision import embedded_default

    pre = Preprocess(tuple(loaded.input_size[1:]), loaded.mean, loaded.std)
    if data is None:
        data, source = embedded_default(None, "seg", "segmentation set (images with object masks)")
    else:
        source = "user"
    data = Path(data)
    if not data.exists():
        raise UserError(f"No data at {data}: give an image folder or a gtsegs-format .mat file with --data.")
    if data.suffix == ".mat":
        if labels is not None:
            raise UserError("--labels is for a flat image folder, not a .mat file: drop it.")
        return SegmentationData(data, pre), data, source, True
    needs = [m for m in metrics if m in _MASK_METRICS]
    if needs:
        raise UserError(f"{', '.join(needs)} need{'s' if len(needs) == 1 else ''} object masks and {data} has none: "
                        "give a gtsegs-format .mat file with --data, or leave these metrics out of --metric.")
    try:
        ds = ImageFolderDataset(data, pre, labels_file=labels, num_classes=int(as_adapter(loaded.model).num_classes),
                                class_names=loaded.class_names)
    except PermissionError:
        raise UserError(f"Cannot read {data} (permission denied): give a readable image folder.") from None
    return ds, data, source, False


_MASK_METRICS = ("pointing_game", "relevance_mass", "relevance_rank")
EvaluateModel = model_option("'embedded', 'embedded-swin', a timm model name, or a checkpoint; 'embedded-text' or a "
                             "local Hugging Face text classifier folder for text.")
EvaluateOut = out_option("evaluate")


def evaluate(
    method: Method,
    metric: str = typer.Option("all", "--metric", help="Metric names, a comma list, or 'all' (insertion, deletion, mif, lif, srg, aopc, abpc, road_morf, road_lerf, saco, pointing_game, relevance_mass, relevance_rank, infidelity, max_sensitivity, randomisation; text models also comprehensiveness, sufficiency, and not ROAD, infidelity, max_sensitivity)."),
    data: Optional[Path] = typer.Option(None, "--data", help="A gtsegs-format .mat file (images with object masks) or an image folder (no masks; default: the embedded shapes segmentation set); for a text model an ERASER dataset folder (default: the embedded reviews)."),
    labels: Labels = None,
    model: EvaluateModel = "embedded",
    split: str = typer.Option("test", "--split", help="Text models: the ERASER split (train, val or test)."),
    limit: Limit = None,
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per batch (each brings ~100 perturbed copies per method)."),
    device: Device = "cpu",
    precision: Precision = "float64",
    random_weights: RandomWeights = False,
    num_workers: NumWorkers = None,
    classes: Classes = None,
    prompt: Prompt = DEFAULT_PROMPT,
    out: EvaluateOut = None,
    overwrite: Overwrite = False,
    fmt: str = typer.Option("markdown", "--format", help="Table format printed at the end: markdown, csv or latex."),
    option: MethodOptions = None,
    quiet: Quiet = False,
):
    """The metric suite: every chosen metric for every chosen method, side by side, and how far their rankings agree.

    Per-image values go to the resumable results file; the report is the method x metric table (best
    per column marked) and the Kendall-tau rank agreement between metrics. docs/metrics.md gives each
    metric's source and protocol.
    """
    from ..evaluation.metrics import resolve_metrics
    from ..evaluation.suite import DEFAULT_OPTIONS, run_suite
    from ..models import as_adapter
    from ..models.loading import load_model
    from ..results.environment import collect_environment
    from ..results.paths import check_output_path
    from ..results.suite_report import suite_report_text
    from ..results.tables import header_line
    from ..evaluation.sharding import open_results
    from .vision import (check_precision_option, common_config, num_workers_option, resolve_methods, sharded,
                         write_skipped_list)

    if fmt not in ("markdown", "csv", "latex"):
        raise UserError(f"Unknown --format {fmt!r}: choose markdown, csv or latex.")
    if _is_text_model(model):
        return _evaluate_text(method, metric, data, labels, model, split, limit, batch_size, device, precision,
                              random_weights, classes, out, overwrite, fmt, quiet, option)
    metrics = resolve_metrics(metric)
    text_only = [m for m in metrics if m in ("comprehensiveness", "sufficiency")]
    if text_only:
        raise UserError(f"{text_only[0]} is ERASER's text metric (words removed or kept) and {model!r} is an image "
                        "model: use it with --model embedded-text, or leave it out of --metric.")
    if labels is not None and data is None:
        raise UserError("--labels needs --data: give the flat image folder the labels file describes.")
    methods = resolve_methods(method)
    options = method_options(option, methods)
    shard, device = sharded(device, batch_size)
    workers = num_workers_option(num_workers)
    precision = check_precision_option(precision)
    loaded = load_model(model, random_weights=random_weights, classes=split_classes(classes), prompt=prompt)
    # 'all' is what this architecture can run; a named method it cannot run is refused before any work
    methods = resolve_methods(method, as_adapter(loaded.model))
    options = method_options(option, methods)
    dataset, data_path, source, _ = _open_data(data, labels, loaded, metrics)
    config = {"benchmark": "suite", **common_config(loaded, methods, data_path.resolve(), source, limit, False,
                                                    precision, batch_size, options),
              "labels": str(Path(labels).resolve()) if labels else None, "metrics": metrics,
              "protocol": DEFAULT_OPTIONS}
    out = out or Path("results") / f"evaluate_{'all' if method == 'all' else '+'.join(methods)}.h5"
    total = len(dataset) if limit is None else min(limit, len(dataset))
    check_output_path(out)
    typer.echo(header_line(config, total))
    main, listed = False, None
    # under torchrun each rank computes its batches into a shard and rank 0 merges (evaluation/sharding.py)
    with open_results(out, config, overwrite, lambda store: run_suite(
            loaded, dataset, store, methods, metrics, limit=limit, batch_size=batch_size,
            forward_batch=max(256, batch_size), device=device, quiet=quiet, precision=precision,
            num_workers=workers, shard=shard, method_options=options),
            shard=shard, device=device, say=typer.echo, total=total,
            environment=collect_environment(precision, device)) as store:
        if store is not None:
            main = True
            store.mark_complete()
            listed = write_skipped_list(store, out)
    if not main:
        return
    typer.echo(suite_report_text(out, fmt))
    if listed is not None:
        typer.echo(f"The images that could not be read are listed in {listed}")
    typer.echo(f"Results written to {out}")


def register(app: typer.Typer):
    app.command("evaluate")(evaluate)
