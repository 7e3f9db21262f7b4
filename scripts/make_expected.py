"""Compute the embedded default's benchmark numbers and write configs/expected/embedded.json.

Every method, both benchmarks, on the CI subset (first PERTURB_LIMIT validation images, a
class-balanced prefix; first SEG_LIMIT segmentation images). tests/test_vision_regression.py
recomputes the same numbers with `compute()` and compares them with the file.

    .venv/bin/python scripts/make_expected.py [--out configs/expected/embedded.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ROOT / "configs" / "expected" / "embedded.json"
PERTURB_LIMIT = 50
SEG_LIMIT = 60
BATCH_SIZE = 50
#: allowed drift, see configs/expected/README.md
TOLERANCE = {"perturbation_auc": 0.05, "segmentation": 0.01, "clean_accuracy": round(100 / PERTURB_LIMIT / 2, 4)}


def compute(perturb_limit: int = PERTURB_LIMIT, seg_limit: int = SEG_LIMIT, batch_size: int = BATCH_SIZE,
            quiet: bool = True, methods=None, method_options: dict | None = None, precision: str = "float64") -> dict:
    """Run both benchmarks on the embedded model and data for every method (or `methods`, with
    `method_options`); return the numbers."""
    from transexplain.data.imagenet import ImageFolderDataset, Preprocess
    from transexplain.data.shapes import VERSION, embedded_paths
    from transexplain.evaluation.perturbation import run_perturbation
    from transexplain.evaluation.segmentation import SegmentationData, run_segmentation
    from transexplain.explainers import method_names
    from transexplain.models import as_adapter
    from transexplain.models.loading import load_model
    from transexplain.results import ResultStore

    loaded = load_model("embedded")
    paths = embedded_paths()
    methods = list(methods or method_names())
    pre = Preprocess(tuple(loaded.input_size[1:]), loaded.mean, loaded.std)
    numbers = {"model_weights_hash": loaded.weights_hash, "data": VERSION, "perturb_limit": perturb_limit,
               "seg_limit": seg_limit, "methods": {}}
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        ds = ImageFolderDataset(paths["val"], pre, num_classes=as_adapter(loaded.model).num_classes,
                                class_names=loaded.class_names)
        store = ResultStore(Path(tmp) / "p.h5", {"benchmark": "perturbation"})
        start = time.perf_counter()
        pert = run_perturbation(loaded, ds, store, methods, tests=("positive", "negative"), targets=("pred", "true"),
                                limit=perturb_limit, batch_size=batch_size, forward_batch=9 * batch_size, quiet=quiet,
                                precision=precision, method_options=method_options)
        timings["perturbation_s"] = round(time.perf_counter() - start, 1)
        numbers["clean_accuracy"] = 100 * store.summary("clean")["accuracy"]
        seg_store = ResultStore(Path(tmp) / "s.h5", {"benchmark": "segmentation"})
        start = time.perf_counter()
        seg = run_segmentation(loaded, SegmentationData(paths["seg"], pre), seg_store, methods, limit=seg_limit,
                               batch_size=batch_size, forward_batch=256, quiet=quiet, precision=precision,
                               method_options=method_options)
        timings["segmentation_s"] = round(time.perf_counter() - start, 1)
    for m in methods:
        numbers["methods"][m] = {
            "perturbation_auc": {f"{test}/{target}": round(pert[f"{m}/{target}/{test}"]["auc"], 4)
                                 for test in ("negative", "positive") for target in ("pred", "true")},
            "segmentation": {k: round(seg[m][k], 4) for k in ("pixel_accuracy", "miou", "map")},
        }
    numbers["timings"] = timings
    return numbers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=EXPECTED)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    numbers = compute(quiet=not args.progress)
    numbers["tolerance"] = TOLERANCE
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(numbers, indent=1) + "\n")
    print(json.dumps(numbers, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
