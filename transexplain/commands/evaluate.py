"""`tx-bench evaluate`: the metric suite (faithfulness, localisation, sanity) side by side."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import UserError
from ..precision import HELP as PRECISION_HELP
from .common import CLASSES_HELP, PROMPT_HELP, split_classes
from .vision import NUM_WORKERS_HELP

#: model specs that name a text classifier (the suite's metrics are image metrics today)
TEXT_MODELS = ("embedded-text",)


def _is_text_model(spec: str) -> bool:
    s = spec.lower()
    return s in TEXT_MODELS or "bert" in s


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


def evaluate(
    method: str = typer.Option(..., "--method", help="Method name (see `tx-bench methods`), a comma list, or 'all'."),
    metric: str = typer.Option("all", "--metric", help="Metric names, a comma list, or 'all' (insertion, deletion, mif, lif, srg, aopc, abpc, road_morf, road_lerf, saco, pointing_game, relevance_mass, relevance_rank, infidelity, max_sensitivity, randomisation)."),
    data: Optional[Path] = typer.Option(None, "--data", help="A gtsegs-format .mat file (images with object masks) or an image folder (no masks; default: the embedded shapes segmentation set)."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Labels file of `filename label` lines for a flat image folder."),
    model: str = typer.Option("embedded", "--model", "-m", help="'embedded', 'embedded-swin', a timm model name, or a checkpoint."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use only the first N images."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per batch (each brings ~100 perturbed copies per method)."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
    precision: str = typer.Option("float64", "--precision", help=PRECISION_HELP),
    random_weights: bool = typer.Option(False, "--random-weights", help="Use the architecture with seeded random weights instead of its pretrained or checkpoint weights."),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", min=0, help=NUM_WORKERS_HELP),
    classes: Optional[str] = typer.Option(None, "--classes", help=CLASSES_HELP),
    prompt: str = typer.Option("a photo of a {}", "--prompt", help=PROMPT_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HDF5 results file (default results/evaluate_<method>.h5)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start the results file over instead of resuming it."),
    fmt: str = typer.Option("markdown", "--format", help="Table format printed at the end: markdown, csv or latex."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
):
    """The metric suite: every chosen metric for every chosen method, side by side, and how far their rankings agree.

    Per-image values go to the resumable results file; the report is the method x metric table (best
    per column marked) and the Kendall-tau rank agreement between metrics. docs/metrics.md gives each
    metric's source and protocol.
    """
    from ..evaluation.metrics import resolve_metrics
    from ..evaluation.suite import DEFAULT_OPTIONS, run_suite
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
    metrics = resolve_metrics(metric)
    if _is_text_model(model):
        raise UserError(f"{', '.join(metrics)} are image metrics and {model!r} is a text model: for text use "
                        "`tx-bench eraser` (comprehensiveness, sufficiency).")
    if labels is not None and data is None:
        raise UserError("--labels needs --data: give the flat image folder the labels file describes.")
    methods = resolve_methods(method)
    shard, device = sharded(device, batch_size)
    workers = num_workers_option(num_workers)
    precision = check_precision_option(precision)
    loaded = load_model(model, random_weights=random_weights, classes=split_classes(classes), prompt=prompt)
    dataset, data_path, source, _ = _open_data(data, labels, loaded, metrics)
    config = {"benchmark": "suite", **common_config(loaded, methods, data_path.resolve(), source, limit, False,
                                                    precision, batch_size),
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
            num_workers=workers, shard=shard),
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
