"""`tx-bench perturb`, `tx-bench segment` and `tx-bench report`: the image benchmarks and their tables."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import UserError
from ..results.paths import check_output_path
from .common import (DEFAULT_PROMPT, BenchmarkPrecision, Classes, Device, Labels, Limit, Method, MethodOptions, Model,
                     NumWorkers, Overwrite, Prompt, Quiet, RandomWeights, SaveMaps, limit_option, method_options,
                     out_option, resolve_methods, split_classes)

PERTURB_TESTS = {"positive": ("positive",), "negative": ("negative",), "both": ("positive", "negative")}
PERTURB_TARGETS = {"pred": ("pred",), "true": ("true",), "both": ("pred", "true")}
PerturbLimit = limit_option("Use only the first N images (class-balanced for class folders).")
PerturbOut = out_option("perturb")
SegmentOut = out_option("segment")


def check_device(device: str) -> str:
    import torch

    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"Unknown device {device!r}: use cpu or cuda.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was given but no CUDA GPU is available: use --device cpu.")
    return device


def model_classes(loaded) -> int:
    from ..models import as_adapter

    return int(as_adapter(loaded.model).num_classes)


def check_precision_option(precision: str) -> str:
    from ..precision import check_benchmark_precision

    return check_benchmark_precision(precision)


def checkpoint_identity(loaded) -> tuple:
    """(timm architecture, pretrained tag): the tag only for timm's own pretrained weights (a
    checkpoint's or a random-init model's pretrained_cfg names a tag its weights do not have)."""
    cfg = getattr(loaded.model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") or str(loaded.name).split(".")[0]
    label = str(getattr(loaded, "weights", "") or "")
    if not str(loaded.source).startswith("timm:"):
        return arch, None
    if label.startswith("pretrained:"):
        return arch, label.split(":", 1)[1] or None
    return arch, (cfg.get("tag") or None) if loaded.weights_hash == "pretrained" else None


def common_config(loaded, methods, data, data_source, limit, crop, precision: str = "float64",
                  batch_size: int | None = None, method_options: dict | None = None) -> dict:
    import transexplain

    architecture, tag = checkpoint_identity(loaded)
    # the `--option` settings, only when given (so the files of runs without them keep their settings)
    extra = {"method_options": method_options} if method_options else {}
    return {**extra, "methods": methods, "model": loaded.name, "model_source": loaded.source,
            "weights_hash": loaded.weights_hash, "weights": getattr(loaded, "weights", None) or None,
            "architecture": architecture, "pretrained_tag": tag,
            "data": str(data), "data_source": data_source, "limit": limit,
            "crop": bool(crop), "input_size": list(loaded.input_size), "mean": list(loaded.mean),
            "std": list(loaded.std), "version": transexplain.__version__, "precision": precision,
            "batch_size": batch_size,
            # a CLIP zero-shot model is defined by its classes and prompt too (None for other models)
            "zero_shot_classes": list(loaded.class_names) if loaded.name.startswith(("clip:", "open_clip:")) else None}


def embedded_default(data, key: str, what: str):
    """(data, source): the user's path, or the embedded shapes set's `key` file, said in one line."""
    if data is not None:
        return data, "user"
    from ..data.shapes import embedded_paths

    data = embedded_paths()[key]
    typer.echo(f"No --data given: using the embedded shapes {what} at {data}.")
    return data, "embedded"


def run_resumable(out: Path, config: dict, overwrite: bool, quiet: bool, run, device: str = "cpu",
                  total: int | None = None, shard=None):
    """Open the results file, run (or resume) into it unless it is complete, then print the table.

    Printed first: the header line (benchmark, model, weights, data, `total` images), and
    "Resuming <out> at image N of M." when an unfinished file is picked up. Under torchrun (`shard`
    of several processes) each rank runs its part into its own shard file and rank 0 merges them
    into `out` (`evaluation.sharding.open_results`); only rank 0 prints.
    """
    from ..evaluation.sharding import WHOLE, open_results
    from ..results.environment import collect_environment
    from ..results.tables import header_line

    check_output_path(out)
    typer.echo(header_line(config, total))
    # a store holds its file's write lock until closed: a second writer is refused meanwhile
    with open_results(out, config, overwrite, run, shard=shard or WHOLE, device=device, say=typer.echo, total=total,
                      environment=collect_environment(config.get("precision"), device)) as store:
        if store is not None:
            finish(store, out, quiet)


def num_workers_option(num_workers: int | None) -> int:
    """--num-workers, or its default: this process's share of the CPU cores less one (at most 8)."""
    from ..data.loader import default_workers

    return default_workers() if num_workers is None else num_workers


def sharded(device: str, batch_size: int):
    """(this process's shard, its device): the whole run on `device`, or under torchrun the batches
    of this rank on its own GPU (`cuda` -> `cuda:LOCAL_RANK`)."""
    from ..evaluation.sharding import from_environment

    shard = from_environment(block=batch_size)
    return shard, check_device(shard.device(device))


def finish(store, out: Path, quiet: bool):
    from ..results.tables import report_text

    store.mark_complete()
    typer.echo(report_text(out, "markdown"))
    listed = write_skipped_list(store, out)
    if listed is not None:
        typer.echo(f"The images that could not be read are listed in {listed}")
    typer.echo(f"Results written to {out}")


def skipped_list_path(out: Path) -> Path:
    """Where the names of a run's unreadable images go: beside the result, `<name>.skipped.txt`."""
    out = Path(out)
    return out.with_name(out.stem + ".skipped.txt")


def write_skipped_list(store, out: Path):
    """Write every skipped example's name (one a line) beside the result; None when none was
    skipped (an old list from an earlier run of the same file is removed)."""
    target = skipped_list_path(out)
    names = store.read("skipped", "name").tolist() if store.done("skipped") else []
    if not names:
        if target.exists():
            target.unlink()
        return None
    target.write_text("".join(f"{name}\n" for name in names), encoding="utf-8")
    return target


def perturb(
    method: Method,
    test: str = typer.Option("both", "--test", help="positive (remove most relevant first), negative, or both."),
    target: str = typer.Option("pred", "--target", help="Explain the predicted class (pred), the ground-truth class (true), or both."),
    data: Optional[Path] = typer.Option(None, "--data", help="Image folder with one sub-folder per class, or a flat folder with --labels (default: the embedded shapes set)."),
    labels: Labels = None,
    model: Model = "embedded",
    limit: PerturbLimit = None,
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images explained per batch (x9 perturbed copies each)."),
    device: Device = "cpu",
    precision: BenchmarkPrecision = "float64",
    random_weights: RandomWeights = False,
    classes: Classes = None,
    prompt: Prompt = DEFAULT_PROMPT,
    out: PerturbOut = None,
    overwrite: Overwrite = False,
    save_maps: SaveMaps = False,
    crop: bool = typer.Option(False, "--crop", help="Resize to 256/224 of the input size and center-crop, instead of the paper's plain resize."),
    num_workers: NumWorkers = None,
    option: MethodOptions = None,
    quiet: Quiet = False,
):
    """ImageNet perturbation test: accuracy as the most (positive) / least (negative) relevant pixels are removed.

    Steps 10%..90% of the pixels, set to black, cumulative; accuracy against the true label; AUC over
    [0, 0.9]. Equal map values are removed in increasing pixel index (a stable sort), in both tests.
    """
    from ..data.imagenet import ImageFolderDataset, Preprocess
    from ..evaluation.metrics import PERTURBATION_STEPS
    from ..evaluation.perturbation import run_perturbation
    from ..models import as_adapter
    from ..models.loading import load_model

    if test not in PERTURB_TESTS:
        raise UserError(f"Unknown --test {test!r}: use positive, negative or both.")
    if target not in PERTURB_TARGETS:
        raise UserError(f"Unknown --target {target!r}: use pred, true or both.")
    if labels is not None and data is None:
        raise UserError("--labels needs --data: give the flat image folder the labels file describes.")
    methods = resolve_methods(method)
    method_options(option, methods)  # a bad --option is refused before the model loads
    shard, device = sharded(device, batch_size)
    workers = num_workers_option(num_workers)
    precision = check_precision_option(precision)
    loaded = load_model(model, random_weights=random_weights, classes=split_classes(classes), prompt=prompt)
    methods = resolve_methods(method, as_adapter(loaded.model))
    options = method_options(option, methods)
    data, source = embedded_default(data, "val", "validation set")
    pre = Preprocess(tuple(loaded.input_size[1:]), loaded.mean, loaded.std, crop=crop)
    try:
        dataset = ImageFolderDataset(data, pre, labels_file=labels, num_classes=model_classes(loaded),
                                     class_names=loaded.class_names)
    except PermissionError:
        raise UserError(f"Cannot read {data} (permission denied): give a readable image folder.") from None
    config = {"benchmark": "perturbation", **common_config(loaded, methods, Path(data).resolve(), source, limit, crop,
                                                           precision, batch_size, options),
              "labels": str(Path(labels).resolve()) if labels else None, "tests": list(PERTURB_TESTS[test]),
              "targets": list(PERTURB_TARGETS[target]), "steps": list(PERTURBATION_STEPS),
              "removal": "black (0 in [0,1] space), top int(H*W*p) pixels, ties by stable flat index",
              "save_maps": bool(save_maps)}
    out = out or Path("results") / f"perturb_{'all' if method == 'all' else '+'.join(methods)}.h5"
    total = len(dataset) if limit is None else min(limit, len(dataset))
    run_resumable(out, config, overwrite, quiet, lambda store: run_perturbation(
        loaded, dataset, store, methods, tests=PERTURB_TESTS[test], targets=PERTURB_TARGETS[target], limit=limit,
        batch_size=batch_size, forward_batch=max(256, 9 * batch_size), device=device, save_maps=save_maps, quiet=quiet,
        precision=precision, num_workers=workers, shard=shard, method_options=options), device=device, total=total,
        shard=shard)
    if dataset.converted:
        n = len(dataset.converted)
        typer.echo(f"Converted to RGB, as `tx-bench explain` does: {n} image{'s' if n != 1 else ''} "
                   f"({'it was' if n == 1 else 'they were'} grey-scale, palette or RGBA).")


def segment(
    method: Method,
    data: Optional[Path] = typer.Option(None, "--data", help="gtsegs_ijcv.mat (MATLAB v7.3) or a file in its layout (default: the embedded shapes set)."),
    model: Model = "embedded",
    limit: Limit = None,
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per batch."),
    device: Device = "cpu",
    precision: BenchmarkPrecision = "float64",
    random_weights: RandomWeights = False,
    classes: Classes = None,
    prompt: Prompt = DEFAULT_PROMPT,
    out: SegmentOut = None,
    overwrite: Overwrite = False,
    save_maps: SaveMaps = False,
    crop: bool = typer.Option(False, "--crop", help="Not used by this benchmark (the protocol resizes image and mask alike); refused."),
    num_workers: NumWorkers = None,
    option: MethodOptions = None,
    quiet: Quiet = False,
):
    """ImageNet-Segmentation: pixel accuracy, mIoU and mAP of mean-thresholded maps against object masks."""
    from ..data.imagenet import Preprocess
    from ..evaluation.segmentation import SegmentationData, run_segmentation
    from ..models import as_adapter
    from ..models.loading import load_model

    if crop:
        raise UserError("--crop does not apply to segment (image and mask are both resized to the model input): drop it.")
    methods = resolve_methods(method)
    method_options(option, methods)  # a bad --option is refused before the model loads
    shard, device = sharded(device, batch_size)
    workers = num_workers_option(num_workers)
    precision = check_precision_option(precision)
    loaded = load_model(model, random_weights=random_weights, classes=split_classes(classes), prompt=prompt)
    methods = resolve_methods(method, as_adapter(loaded.model))
    options = method_options(option, methods)
    data, source = embedded_default(data, "seg", "segmentation set")
    try:
        seg = SegmentationData(data, Preprocess(tuple(loaded.input_size[1:]), loaded.mean, loaded.std))
    except PermissionError:
        raise UserError(f"Cannot read {data} (permission denied): give a readable gtsegs_ijcv.mat.") from None
    config = {"benchmark": "segmentation", **common_config(loaded, methods, Path(data).resolve(), source, limit, False,
                                                           precision, batch_size, options),
              "target": "pred", "threshold": "mean", "mask_resize": "nearest", "save_maps": bool(save_maps)}
    out = out or Path("results") / f"segment_{'all' if method == 'all' else '+'.join(methods)}.h5"
    total = len(seg) if limit is None else min(limit, len(seg))
    run_resumable(out, config, overwrite, quiet, lambda store: run_segmentation(
        loaded, seg, store, methods, limit=limit, batch_size=batch_size, forward_batch=max(256, batch_size),
        device=device, save_maps=save_maps, quiet=quiet, precision=precision, num_workers=workers, shard=shard,
        method_options=options), device=device, total=total, shard=shard)


def report(
    results: List[Path] = typer.Argument(..., help="HDF5 results files written by perturb, segment, eraser or evaluate; files of one benchmark and the same settings (one per method, as the quick start writes) become one table."),
    fmt: str = typer.Option("markdown", "--format", help="markdown, csv (every table), latex (booktabs, with a caption) or json."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the accuracy-vs-removed-fraction curves (or ERASER's token F1 over k) to this PNG; for an evaluate (metric suite) file, a folder (or a .png whose name prefixes the files) for one PNG per curve metric and the rank-agreement heatmap."),
):
    """Print results files as the paper's tables (methods as columns); optionally plot the curves.

    An unfinished run is reported too: its numbers cover the examples done so far and are marked
    partial in every format. A metric-suite file (`tx-bench evaluate`) prints the method x metric
    table (best per column marked) and the Kendall-tau rank agreement between its metrics.
    """
    from ..results import ResultStore
    from ..results.tables import FORMATS, report_text

    if fmt not in FORMATS:
        raise UserError(f"Unknown --format {fmt!r}: choose {', '.join(FORMATS[:-1])} or {FORMATS[-1]}.")
    stores = [(path, ResultStore(path)) for path in results]
    suite_files = [path for path, store in stores if store.benchmark == "suite"]
    eraser_files = [path for path, store in stores if store.benchmark == "eraser"]
    if plot is not None and len(results) > 1:
        raise UserError("--plot draws one results file: give one file with it.")
    typer.echo(report_of(results, fmt))
    if plot is not None and suite_files:
        from ..results.plots import plot_suite

        written = plot_suite(results[0], plot)["files"]
        typer.echo(f"Plots written: {', '.join(map(str, written))}")
    elif plot is not None:
        if eraser_files:
            from ..evaluation import eraser

            eraser.plot(results[0], plot)
        else:
            from ..results.plots import plot_curves

            plot_curves(results[0], plot)
        typer.echo(f"Plot written to {plot}")


def report_of(results, fmt: str = "markdown") -> str:
    """The report of results files of any benchmark (perturbation / segmentation tables, ERASER, the
    metric suite), in one format: what `tx-bench report` prints and `merge` prints after merging."""
    from ..results import ResultStore
    from ..results.tables import report_text

    results = [Path(results)] if isinstance(results, (str, Path)) else list(results)
    stores = [(path, ResultStore(path)) for path in results]
    image_files = [path for path, store in stores if store.benchmark not in ("eraser", "suite")]
    parts = []
    if image_files:
        parts.append(report_text(image_files, fmt))
    for path, store in stores:
        if store.benchmark == "eraser":
            parts.append(eraser_report(path, fmt))
        elif store.benchmark == "suite":
            from ..results.suite_report import suite_report_json, suite_report_text

            parts.append(json.dumps({"tables": [suite_report_json(path)]}, default=str) if fmt == "json"
                         else suite_report_text(path, fmt))
    if fmt == "json":
        tables = [t for part in parts for t in json.loads(part)["tables"]]
        return json.dumps({"tables": tables}, indent=2)
    return "\n\n".join(p.rstrip("\n") for p in parts)


def eraser_report(path: Path, fmt: str) -> str:
    """The ERASER module's report of one file with the environment notes under it."""
    from ..evaluation import eraser
    from ..results import ResultStore
    from ..results.tables import notes_under_table

    text = eraser.report_text(path, fmt).rstrip("\n")
    if fmt == "json":
        return text
    return text + ("\n" if fmt == "csv" else "\n\n") + notes_under_table(ResultStore(path), "eraser", fmt)


def merge(
    shards: List[Path] = typer.Argument(..., help="Every shard file of one run (<out>.shard-<rank>-of-<world>.h5), e.g. gathered from several machines."),
    out: Path = typer.Option(..., "--out", "-o", help="The merged HDF5 results file."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out when it exists."),
):
    """Merge the shard files of a run made by several processes (torchrun) into one results file.

    The per-image records go in image order and every summary is recomputed from them: the file is
    the one a single process would have written. Shards of other settings, a missing or unfinished
    shard are refused, naming the files; the shards are only read.
    """
    from ..evaluation.sharding import merge_shards
    from ..results import ResultStore
    from ..results.tables import report_text

    check_output_path(out)
    merge_shards(shards, out, overwrite=overwrite)
    store = ResultStore(out)
    typer.echo(report_of(out, "markdown"))
    typer.echo(f"Merged {len(shards)} shards into {out}")


def register(app: typer.Typer):
    app.command("perturb")(perturb)
    app.command("segment")(segment)
    app.command("report")(report)
    app.command("merge")(merge)
