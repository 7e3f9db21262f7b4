"""How far the benchmarks' low precisions move the maps and the perturbation AUCs (docs/numerics.md).

For each method: the maps of float32, bfloat16 and float16 (the model in float32 under autocast,
relevance methods in float32 unless --relevance-autocast) against float64 on the same images
(mean Spearman rank correlation per image, largest absolute difference of the [0, 1] maps), and the
perturbation test's AUCs (positive and negative, predicted class) in each precision, with the
difference to float64 in AUC points.

    .venv/bin/python scripts/precision_agreement.py [--images 64] [--device cpu] [--model embedded]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_METHODS = "rollout,gradcam,generic_attention,saliency,transformer_attribution,attnlrp"
PRECISIONS = ("float64", "float32", "bfloat16", "float16")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    rho = spearmanr(a.reshape(-1), b.reshape(-1)).statistic
    return float(rho) if np.isfinite(rho) else 1.0


def main(argv=None):
    from transexplain.data.imagenet import ImageFolderDataset, Preprocess
    from transexplain.data.shapes import embedded_paths
    from transexplain.evaluation import perturbation
    from transexplain.evaluation.metrics import accuracy_curve, perturbation_auc
    from transexplain.models import as_adapter
    from transexplain.models.loading import load_model
    from transexplain.precision import PRECISIONS as DTYPES, adapter_at, at_precision, autocast, model_precision

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", default=None, help="image folder (default: the embedded shapes validation set)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--relevance-autocast", action="store_true", help="run the relevance methods under autocast too")
    args = ap.parse_args(argv)

    loaded = load_model(args.model)
    pre = Preprocess(tuple(loaded.input_size[1:]), loaded.mean, loaded.std)
    data = ImageFolderDataset(args.data or embedded_paths()["val"], pre, num_classes=as_adapter(loaded.model).num_classes,
                              class_names=loaded.class_names)
    n = min(args.images, len(data))
    x_all = torch.stack([data.load(i) for i in range(n)])
    y_all = torch.tensor([data.label(i) for i in range(n)])
    fill = pre.fill.to(args.device)
    if args.relevance_autocast:
        original = perturbation.explain_maps

        def explain_maps(adapter, x, method, target, precision, options=None):
            from transexplain import explain

            with autocast(precision, x.device):
                maps = explain(adapter, x, method=method, target=target, precision=model_precision(precision)).heatmap
            return maps.float() if precision in ("bfloat16", "float16") else maps

        perturbation.explain_maps = explain_maps
    results = {}
    for precision in PRECISIONS:
        model = at_precision(loaded.model.to(args.device).eval(), model_precision(precision))
        adapter = adapter_at(model, model_precision(precision))
        dtype = DTYPES[model_precision(precision)]
        for method in args.methods.split(","):
            maps, hits = [], {True: [], False: []}
            for i in range(0, n, args.batch_size):
                x = x_all[i:i + args.batch_size].to(args.device, dtype)
                y = y_all[i:i + args.batch_size].to(args.device)
                with autocast(precision, args.device):
                    pred = perturbation.predict(model, x, 256)
                m = perturbation.explain_maps(adapter, x, method, pred, precision)
                maps.append(m.detach().double().cpu().numpy())
                for positive in (True, False):
                    with autocast(precision, args.device):
                        h = perturbation.perturbation_hits(model, x, m, y, fill, positive, 256)
                    hits[positive].append(torch.cat([(pred == y).view(-1, 1), h], 1).cpu().numpy())
            results[precision, method] = {
                "maps": np.concatenate(maps),
                "auc": {pos: perturbation_auc(accuracy_curve(np.concatenate(h))) for pos, h in hits.items()},
            }
    if args.relevance_autocast:
        perturbation.explain_maps = original
    print(f"model {loaded.name}, {n} images, device {args.device}"
          f"{', relevance methods under autocast too' if args.relevance_autocast else ''}")
    print("| method | precision | Spearman vs float64 (mean / min) | max abs diff | AUC pos (Δ) | AUC neg (Δ) |")
    print("|---|---|---|---|---|---|")
    for method in args.methods.split(","):
        ref = results["float64", method]
        for precision in PRECISIONS:
            r = results[precision, method]
            rho = [spearman(a, b) for a, b in zip(ref["maps"], r["maps"])]
            diff = float(np.max(np.abs(ref["maps"] - r["maps"])))
            cells = [f"{r['auc'][pos]:.2f} ({r['auc'][pos] - ref['auc'][pos]:+.2f})" for pos in (True, False)]
            print(f"| {method} | {precision} | {np.mean(rho):.4f} / {np.min(rho):.4f} | {diff:.2e} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
