"""Measure the ln_stats variants (and the reference methods) on the embedded segmentation set.

For each method the heatmap (upsampled, min-max normalised) of the predicted class is scored
against the object mask: pixel accuracy, mIoU (dataset level, threshold = the map's mean), mAP,
and the ratio of the mean heatmap inside the mask to the mean outside. The same images are also
used for the perturbation test (remove the top / bottom 10..90% pixels, AUC of accuracy against
the true label; positive: lower is better, negative: higher is better).

    python scripts/ln_stats_eval.py [--model embedded-swin] [--n 200] [--methods ...]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import transexplain
import transexplain.explainers.ln_stats  # noqa: F401  (registers ln_stats)
from transexplain.data import shapes
from transexplain.data.gtsegs import GtSegsDataset
from transexplain.evaluation import metrics
from transexplain.evaluation.perturbation import perturbation_hits
from transexplain.explainers.ln_stats import VARIANTS
from transexplain.models.loading import load_model

REFERENCE = ["transformer_attribution", "generic_attention", "rollout", "gradcam", "random"]


def method_list(names):
    out = []
    for name in names:
        if name == "ln_stats:all":
            out += [f"ln_stats:{v}" for v in VARIANTS]
        else:
            out.append(name)
    return out


def explain(model, x, spec):
    if spec.startswith("ln_stats:"):
        return transexplain.explain(model, x, "ln_stats", variant=spec.split(":", 1)[1])
    if spec == "rollout":
        return transexplain.explain(model, x, "rollout", start_layer=0)
    return transexplain.explain(model, x, spec)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded-swin")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch", type=int, default=25)
    ap.add_argument("--methods", nargs="*", default=REFERENCE + ["ln_stats:all"])
    args = ap.parse_args()
    torch.set_num_threads(1)  # faster than 2 on shared, oversubscribed cores
    loaded = load_model(args.model)
    model = loaded.model
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    ds = GtSegsDataset(shapes.embedded_paths()["seg"])
    n = min(args.n, len(ds))
    items = [ds[i] for i in range(n)]
    imgs = torch.from_numpy(np.stack([it[0] for it in items])).permute(0, 3, 1, 2).float() / 255.0
    x_all = (imgs - mean) / std
    masks = np.stack([it[1] for it in items]).astype(np.int64)
    labels = torch.tensor([it[2] for it in items])
    fill = ((torch.zeros(3) - mean.view(3)) / std.view(3)).view(3, 1, 1)
    rows = []
    for spec in method_list(args.methods):
        t0 = time.time()
        heat = []
        for i in range(0, n, args.batch):
            heat.append(explain(model, x_all[i:i + args.batch], spec).heatmap.float())
        heat = torch.cat(heat)
        h = heat.numpy().astype(np.float64)
        pred = metrics.threshold_at_mean(h).astype(np.int64)
        correct, labeled = metrics.pixel_counts(pred, masks)
        inter, union = metrics.intersection_union(pred, masks)
        ap_ = float(np.mean([metrics.average_precision(h[i], masks[i]) for i in range(n)]))
        inside = np.array([h[i][masks[i] == 1].mean() for i in range(n)])
        outside = np.array([h[i][masks[i] == 0].mean() for i in range(n)])
        pos = perturbation_hits(model, x_all, heat, labels, fill, positive=True, forward_batch=450)
        neg = perturbation_hits(model, x_all, heat, labels, fill, positive=False, forward_batch=450)
        with torch.no_grad():
            clean = torch.cat([model(x_all[i:i + 100]).argmax(-1) for i in range(0, n, 100)]) == labels
        auc = {}
        for name, hits in (("pos", pos), ("neg", neg)):
            curve = metrics.accuracy_curve(torch.cat([clean.view(-1, 1), hits], 1).numpy())
            auc[name] = metrics.perturbation_auc(curve)
        rows.append((spec, metrics.pixel_accuracy(correct, labeled), metrics.mean_iou(inter, union), 100 * ap_,
                     float(np.mean(inside / np.maximum(outside, 1e-12))), auc["pos"], auc["neg"], time.time() - t0))
        print(f"{spec:28s} done in {time.time() - t0:.0f}s", flush=True)
    print(f"\nmodel {args.model} ({loaded.weights_hash}), {n} images of {shapes.VERSION} seg, target = predicted class\n")
    print("| method | pixel acc % | mIoU % | mAP % | in/out mean | pos. AUC (lower better) | neg. AUC (higher better) |")
    print("|---|---|---|---|---|---|---|")
    for spec, pa, miou, map_, ratio, pos_auc, neg_auc, _ in rows:
        print(f"| {spec} | {pa:.1f} | {miou:.1f} | {map_:.1f} | {ratio:.2f} | {pos_auc:.1f} | {neg_auc:.1f} |")


if __name__ == "__main__":
    main()
