"""The ImageNet perturbation test: remove the most (positive) or least (negative) relevant pixels.

Protocol (configs/paper.toml [protocol.perturbation]; README, "Benchmarks on real data"): for p in
0.1..0.9 the top `int(H·W·p)` pixels of the upsampled, min-max normalised map are set to black (0 in
[0, 1] space, i.e. `-mean/std` after normalisation), cumulatively; the score is top-1 accuracy
against the ground-truth label whatever class was explained. Ties in the map are broken by a stable
sort on the flat pixel index (row-major): among equal values the lower index is removed first, in
both tests. The nine masked copies of a whole batch come from one argsort and run through the model
in large batches; there is no per-image loop on the hot path.
"""
from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import torch

from .. import interrupt
from .metrics import PERTURBATION_STEPS, accuracy_curve, perturbation_auc, removal_counts
from .metrics._common import removal_rank

TESTS = ("positive", "negative")
TARGETS = ("pred", "true")
#: test hook: after this many committed batches the runner SIGKILLs itself (resume tests)
KILL_ENV = "TX_BENCH_KILL_AFTER_BATCH"
#: test hook: the torchrun rank that the kill hook applies to (all when unset)
KILL_RANK_ENV = "TX_BENCH_KILL_RANK"


def removal_masks(heatmaps: torch.Tensor, positive: bool, steps=PERTURBATION_STEPS) -> torch.Tensor:
    """(B, H, W) maps -> (B, len(steps), H, W) bool, True where a pixel is removed at that step.

    Step k removes the first `int(H·W·p_k)` pixels in removal order: decreasing relevance for the
    positive test, increasing for the negative one, ties by increasing flat index (stable sort); the
    order is `metrics._common.removal_rank`'s (values closer than 2**-32 of the map's range tie).
    """
    b, h, w = heatmaps.shape
    rank = removal_rank(heatmaps, most_first=positive).reshape(b, h * w)
    counts = torch.tensor(removal_counts(h * w, steps), device=heatmaps.device)
    return (rank.unsqueeze(1) < counts.view(1, -1, 1)).reshape(b, len(steps), h, w)


def perturbed_copies(x: torch.Tensor, masks: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images, (B, S, H, W) masks, (C, 1, 1) fill -> (B·S, C, H, W) masked copies."""
    b, s = masks.shape[:2]
    copies = torch.where(masks.unsqueeze(2), fill.to(x).unsqueeze(0).unsqueeze(0), x.unsqueeze(1))
    return copies.reshape(b * s, *x.shape[1:])


@torch.no_grad()  # not inference_mode: the predictions are targets of explanations that take gradients
def predict(model, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Predicted classes of `x`, run in chunks of `batch_size`."""
    preds = [model(x[i:i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)]
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=x.device)


def perturbation_hits(model, x, heatmaps, labels, fill, positive: bool, forward_batch: int) -> torch.Tensor:
    """(B, 9) bool: the perturbed image at each step is still classified as its label."""
    masks = removal_masks(heatmaps.to(x.device), positive)
    steps = masks.shape[1]
    hits = []
    # a slab of whole images at a time keeps memory bounded while each forward stays large
    images_per_slab = max(1, forward_batch // steps)
    for i in range(0, len(x), images_per_slab):
        copies = perturbed_copies(x[i:i + images_per_slab], masks[i:i + images_per_slab], fill)
        pred = predict(model, copies, forward_batch).view(-1, steps)
        hits.append(pred == labels[i:i + images_per_slab].view(-1, 1))
    return torch.cat(hits)


def progress_bar(total: int, initial: int, quiet: bool, desc: str):
    """A tqdm bar with images/s and the ETA; off with --quiet, when stderr is not a terminal, and on
    every rank of a sharded run but the first (whose part stands for the whole run's pace)."""
    from tqdm import tqdm

    from .sharding import is_main_process

    return tqdm(total=total, initial=initial, desc=desc, unit="img", dynamic_ncols=True,
                disable=quiet or not sys.stderr.isatty() or not is_main_process())


def maybe_kill(batches_done: int):
    """SIGKILL this process after the number of batches named in $TX_BENCH_KILL_AFTER_BATCH (tests);
    with $TX_BENCH_KILL_RANK set, only in the torchrun rank it names."""
    limit = os.environ.get(KILL_ENV)
    rank = os.environ.get(KILL_RANK_ENV)
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return
    if limit and batches_done >= int(limit):
        os.kill(os.getpid(), signal.SIGKILL)


def explain_maps(adapter, x, method: str, target, precision: str, options: dict | None = None) -> torch.Tensor:
    """(B, H, W) heatmaps of `method` in the run's `precision`. For bfloat16 / float16 the model is in
    float32 and a gradient or attention method runs under autocast; a relevance method (one that
    needs a relevance pass) runs in float32: the LRP rules do not run under autocast, and float32
    already moves their maps (docs/numerics.md). The maps then come back in float32."""
    from .. import explain
    from ..explainers import get_method
    from ..precision import AUTOCAST, autocast, model_precision

    low = precision in AUTOCAST
    amp = low and "relevance" not in get_method(method).needs
    with autocast(precision if amp else "float32", x.device):
        maps = explain(adapter, x, method=method, target=target, precision=model_precision(precision),
                       **(options or {})).heatmap
    return maps.float() if low else maps


def batches(dataset, store, shard, limit, batch_size: int, num_workers: int, device: str):
    """(loader, done, todo): the `BatchLoader` over this shard's part of dataset[:limit] not yet in
    `store`, how many of the part are done, and how many there are in all."""
    from ..data.loader import BatchLoader
    from .sharding import WHOLE

    stop = len(dataset) if limit is None else min(limit, len(dataset))
    part = (shard or WHOLE).indices(stop)
    done = store.position
    loader = BatchLoader(dataset, part[done:], batch_size, num_workers=num_workers,
                         pin_memory=str(device).startswith("cuda"), position=done)
    return loader, done, len(part)


def skipped_rows(dataset, batch) -> dict:
    """The store rows of a batch's unreadable images ({} when every image was read)."""
    if not batch.skipped:
        return {}
    return {"skipped": {"index": np.array(batch.skipped, dtype=np.int64),
                        "name": np.array([dataset.name(j) for j in batch.skipped], dtype=object)}}


def record_timings(timings: dict | None, loader, images: int, t0: float):
    """Fill `timings` (when given) with the wall time, the time spent waiting for data, and the images."""
    if timings is not None:
        timings.update(total_s=time.perf_counter() - t0, load_s=loader.load_s, images=images)


def run_perturbation(loaded, dataset, store, methods, tests=TESTS, targets=("pred",), limit=None,
                     batch_size: int = 32, forward_batch: int = 256, device: str = "cpu",
                     save_maps: bool = False, quiet: bool = False, precision: str = "float64",
                     method_options: dict | None = None, num_workers: int = 0, shard=None,
                     timings: dict | None = None) -> dict:
    """Run the perturbation test for every method, test and target; resume from `store`'s commit.

    loaded: a `LoadedModel`; dataset: an `ImageFolderDataset`; store: a `ResultStore` whose config
    describes this run. Returns the summaries {"method/target/test": {"curve", "auc", "n"}}.
    Groups written, every row with its image's `index`: `clean` (index, name, label, pred, hit),
    `<method>/<target>` (target; map when save_maps), `<method>/<target>/<test>` (hits: (N, 10)
    bool, step 0 = clean image), `skipped` (index, name).
    precision: "float64" (default), "mixed", "float32" (every forward and explanation, on a cast
    copy of the model: `transexplain.precision.at_precision`), or "bfloat16" / "float16" (see
    `transexplain.precision`). num_workers: decoding processes (`data.loader`); shard: the part of
    the images this process takes (`evaluation.sharding.Shard`; all of them by default).
    timings: filled with total_s, load_s and images when given.
    """
    from ..data.imagenet import Preprocess
    from ..explainers import get_method
    from ..precision import PRECISIONS, adapter_at, at_precision, autocast, check_benchmark_precision, model_precision

    t0 = time.perf_counter()
    precision = check_benchmark_precision(precision)
    model = at_precision(loaded.model.to(device).eval(), model_precision(precision))
    adapter = adapter_at(model, model_precision(precision))
    dtype = PRECISIONS[model_precision(precision)]
    fill = Preprocess(tuple(loaded.input_size[1:]), loaded.mean, loaded.std).fill.to(device)
    loader, start, stop = batches(dataset, store, shard, limit, batch_size, num_workers, device)
    batches_done = 0
    bar = progress_bar(stop, start, quiet, "perturbation")
    interrupt.progress(start, stop)
    for batch in loader:
        rows = skipped_rows(dataset, batch)
        if batch.indices:
            idx = np.array(batch.indices, dtype=np.int64)
            x = batch.items.to(device=device, dtype=dtype, non_blocking=True)
            y = torch.tensor([dataset.label(j) for j in batch.indices], dtype=torch.long, device=device)
            with autocast(precision, device):
                pred = predict(model, x, forward_batch)
            clean_hit = pred == y
            rows["clean"] = {"index": idx, "name": np.array([dataset.name(j) for j in batch.indices], dtype=object),
                             "label": y.cpu().numpy(), "pred": pred.cpu().numpy(), "hit": clean_hit.cpu().numpy()}
            for method in methods:
                class_specific = get_method(method).class_specific
                options = (method_options or {}).get(method, {})
                pred_maps, pred_hits = None, {}
                for target in targets:
                    wanted = pred if target == "pred" else y
                    if target == "true" and pred_maps is not None:
                        # where the prediction is right (or the method ignores the class) the
                        # explanation and so every perturbed forward are the same as for "pred"
                        redo = (pred != y) if class_specific else torch.zeros_like(y, dtype=torch.bool)
                        maps = pred_maps.clone()
                        hits = {test: h.clone() for test, h in pred_hits.items()}
                        if redo.any():
                            sub = redo.nonzero().squeeze(1)
                            maps[sub] = explain_maps(adapter, x[sub], method, y[sub], precision, options).to(maps)
                            for test in tests:
                                with autocast(precision, device):
                                    hits[test][sub] = perturbation_hits(model, x[sub], maps[sub], y[sub], fill,
                                                                        test == "positive", forward_batch)
                    else:
                        maps = explain_maps(adapter, x, method, wanted, precision, options)
                        with autocast(precision, device):
                            hits = {test: perturbation_hits(model, x, maps, y, fill, test == "positive", forward_batch)
                                    for test in tests}
                    if target == "pred":
                        pred_maps, pred_hits = maps, hits
                    group = f"{method}/{target}"
                    rows[group] = {"index": idx, "target": wanted.cpu().numpy()}
                    if save_maps:
                        rows[group]["map"] = maps.detach().float().cpu().numpy().astype(np.float16)
                    for test in tests:
                        full = torch.cat([clean_hit.view(-1, 1), hits[test]], dim=1)
                        rows[f"{group}/{test}"] = {"index": idx, "hits": full.cpu().numpy()}
        store.write_batch(rows, position=batch.position)
        interrupt.progress(batch.position, stop)
        batches_done += 1
        bar.update(batch.position - bar.n)
        maybe_kill(batches_done)
    bar.close()
    record_timings(timings, loader, stop - start, t0)
    return summarise(store, methods, tests, targets)


def summarise_stored(store) -> dict:
    """`summarise` with the methods, tests and targets of the store's own config (merging shards)."""
    config = store.config
    return summarise(store, config["methods"], tuple(config["tests"]), tuple(config["targets"]))


def summarise(store, methods, tests, targets) -> dict:
    """Curves and AUCs from the stored per-image hits; written as each group's summary."""
    out = {}
    for method in methods:
        for target in targets:
            for test in tests:
                group = f"{method}/{target}/{test}"
                hits = store.read(group, "hits") if store.done(group) else np.zeros((0, 10), dtype=bool)
                curve = accuracy_curve(hits)
                summary = {"curve": [float(v) for v in curve], "auc": perturbation_auc(curve), "n": int(len(hits))}
                store.set_summary(group, summary)
                out[group] = summary
    n_clean = store.done("clean")
    hit = store.read("clean", "hit") if n_clean else np.zeros(0, dtype=bool)
    skipped = store.read("skipped", "name").tolist() if store.done("skipped") else []
    store.set_summary("clean", {"accuracy": float(hit.mean()) if len(hit) else float("nan"), "n": int(n_clean),
                                "skipped": len(skipped), "skipped_names": skipped[:50]})
    return out
