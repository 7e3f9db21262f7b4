"""The ImageNet-Segmentation test: how well a relevance map, thresholded at its mean, finds the object.

Protocol (configs/paper.toml [protocol.segmentation]; README, "Benchmarks on real data"): image
resized to the model input and normalised, mask resized with NEAREST; explanation of the predicted
class; foreground = map > mean(map). Per image we store the counts the dataset-level metrics need
(correct and labeled pixels, per-class intersection and union) and the image's AP, so any subset can
be re-scored.
"""
from __future__ import annotations

import time

import numpy as np

from .. import interrupt
from .metrics import (average_precision, intersection_union, mean_average_precision, mean_iou, pixel_accuracy,
                      pixel_counts, threshold_at_mean)
from .perturbation import batches, explain_maps, maybe_kill, predict, progress_bar, record_timings, skipped_rows


class SegmentationData:
    """A gtsegs-format file preprocessed for a model: `load(i) -> (image tensor, mask (H, W) uint8)`."""

    def __init__(self, path, preprocess):
        from ..data.gtsegs import GtSegsDataset

        self.source = GtSegsDataset(path)
        self.preprocess = preprocess

    def __len__(self):
        return len(self.source)

    def name(self, i: int) -> str:
        return str(i)

    def load(self, i: int):
        """(normalised image, resized mask) or None when the item cannot be read."""
        from PIL import Image

        try:
            image, mask, _ = self.source[i]
            h, w = self.preprocess.size
            img = Image.fromarray(np.asarray(image, dtype=np.uint8)).resize((w, h), Image.BILINEAR)
            msk = Image.fromarray((np.asarray(mask) != 0).astype(np.uint8)).resize((w, h), Image.NEAREST)
            return self.preprocess.normalise(np.array(img)), np.array(msk, dtype=np.uint8)
        except (OSError, ValueError, KeyError, TypeError):
            return None


def segmentation_rows(maps: np.ndarray, masks: np.ndarray) -> dict:
    """Per-image metric contributions of (B, H, W) maps in [0, 1] against (B, H, W) {0, 1} masks."""
    predicted = threshold_at_mean(maps).astype(np.int64)
    correct, labeled = pixel_counts(predicted, masks)
    inter, union = intersection_union(predicted, masks, 2)
    ap = np.array([average_precision(m, t) for m, t in zip(maps, masks)], dtype=np.float64)
    return {"correct": correct, "labeled": labeled, "inter": inter, "union": union, "ap": ap}


def run_segmentation(loaded, data: SegmentationData, store, methods, limit=None, batch_size: int = 32,
                     forward_batch: int = 256, device: str = "cpu", save_maps: bool = False,
                     quiet: bool = False, precision: str = "float64",
                     method_options: dict | None = None, num_workers: int = 0, shard=None,
                     timings: dict | None = None) -> dict:
    """Explain the predicted class of every image with every method and score the maps.

    Groups, every row with its image's `index`: `images` (index, pred), `<method>` (index, correct,
    labeled, inter, union, ap [, map]), `skipped` (index, name). Returns {method: {"pixel_accuracy",
    "miou", "map", "n"}} (percent). precision: as for `run_perturbation`, for the forwards and the
    explanations alike; num_workers, shard, timings: as for `run_perturbation`.
    """
    from ..precision import PRECISIONS, adapter_at, at_precision, autocast, check_benchmark_precision, model_precision

    t0 = time.perf_counter()
    precision = check_benchmark_precision(precision)
    model = at_precision(loaded.model.to(device).eval(), model_precision(precision))
    adapter = adapter_at(model, model_precision(precision))
    dtype = PRECISIONS[model_precision(precision)]
    loader, start, stop = batches(data, store, shard, limit, batch_size, num_workers, device)
    batches_done = 0
    bar = progress_bar(stop, start, quiet, "segmentation")
    interrupt.progress(start, stop)
    for batch in loader:
        rows = skipped_rows(data, batch)
        if batch.indices:
            idx = np.array(batch.indices, dtype=np.int64)
            images, masks = batch.items
            x = images.to(device=device, dtype=dtype, non_blocking=True)
            masks = masks.numpy()
            with autocast(precision, device):
                pred = predict(model, x, forward_batch)
            rows["images"] = {"index": idx, "pred": pred.cpu().numpy()}
            for method in methods:
                maps = explain_maps(adapter, x, method, pred, precision,
                                    (method_options or {}).get(method, {})).detach().float().cpu().numpy()
                rows[method] = {"index": idx, **segmentation_rows(maps, masks)}
                if save_maps:
                    rows[method]["map"] = maps.astype(np.float16)
        store.write_batch(rows, position=batch.position)
        interrupt.progress(batch.position, stop)
        batches_done += 1
        bar.update(batch.position - bar.n)
        maybe_kill(batches_done)
    bar.close()
    record_timings(timings, loader, stop - start, t0)
    return summarise(store, methods)


def summarise_stored(store) -> dict:
    """`summarise` with the methods of the store's own config (merging shards)."""
    return summarise(store, store.config["methods"])


def summarise(store, methods) -> dict:
    """Dataset-level metrics from the stored per-image contributions; written as group summaries."""
    out = {}
    for method in methods:
        if not store.done(method):
            out[method] = {"pixel_accuracy": float("nan"), "miou": float("nan"), "map": float("nan"), "n": 0}
            continue
        read = lambda name: store.read(method, name)  # noqa: E731
        summary = {"pixel_accuracy": pixel_accuracy(read("correct"), read("labeled")),
                   "miou": mean_iou(read("inter"), read("union")),
                   "map": mean_average_precision(read("ap")), "n": int(store.done(method))}
        store.set_summary(method, summary)
        out[method] = summary
    skipped = store.read("skipped", "name").tolist() if store.done("skipped") else []
    store.set_summary("images", {"n": int(store.done("images")), "skipped": len(skipped), "skipped_names": skipped[:50]})
    return out
