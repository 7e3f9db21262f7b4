"""The embedded benchmark numbers of the LRP-based methods with the reference's stabiliser and with
the relative one (`epsilon="relative"`), side by side, on the CI subset of scripts/make_expected.py.

    .venv/bin/python scripts/stabilised_benchmark.py [--precision float64]
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("full_lrp", "partial_lrp", "transformer_attribution")
COLUMNS = [("perturbation_auc", "negative/pred", "negative AUC ↑"), ("perturbation_auc", "positive/pred", "positive AUC ↓"),
           ("segmentation", "pixel_accuracy", "pixel acc"), ("segmentation", "miou", "mIoU"), ("segmentation", "map", "mAP")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="float64", choices=["float64", "float32"])
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("make_expected", ROOT / "scripts" / "make_expected.py")
    make_expected = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_expected)
    runs = {eps: make_expected.compute(methods=METHODS, precision=args.precision,
                                       method_options={m: {"epsilon": eps} for m in METHODS})
            for eps in ("absolute", "relative")}
    print(f"embedded ViT, {runs['absolute']['perturb_limit']} perturbation / {runs['absolute']['seg_limit']} "
          f"segmentation images, {args.precision}")
    print("| method | epsilon | " + " | ".join(c[2] for c in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for m in METHODS:
        for eps, numbers in runs.items():
            vals = [numbers["methods"][m][group][key] for group, key, _ in COLUMNS]
            print(f"| {m} | {eps} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")


if __name__ == "__main__":
    main()
