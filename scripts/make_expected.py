"""Compute the embedded models' benchmark numbers and write configs/expected/embedded.json
(the embedded ViT) and configs/expected/embedded_swin.json (the embedded Swin).

Every method the architecture can run, both benchmarks, on the CI subset (the first perturb_limit
validation images, a class-balanced prefix; the first seg_limit segmentation images).
tests/test_vision_regression.py recomputes the same numbers with `compute()` and compares them.

    .venv/bin/python scripts/make_expected.py [--model embedded|embedded-swin|both]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ROOT / "configs" / "expected" / "embedded.json"
#: per embedded model: its expected file and the CI subset (the Swin's is smaller: it costs more per image)
MODELS = {
    "embedded": {"file": EXPECTED, "perturb_limit": 50, "seg_limit": 60},
    "embedded-swin": {"file": ROOT / "configs" / "expected" / "embedded_swin.json", "perturb_limit": 20, "seg_limit": 20},
}
PERTURB_LIMIT = MODELS["embedded"]["perturb_limit"]
SEG_LIMIT = MODELS["embedded"]["seg_limit"]
BATCH_SIZE = 50
#: allowed drift, see configs/expected/README.md
def tolerance(perturb_limit: int) -> dict:
    return {"perturbation_auc": 0.05, "segmentation": 0.01, "clean_accuracy": round(100 / perturb_limit / 2, 4)}


TOLERANCE = tolerance(PERTURB_LIMIT)


def compute(perturb_limit: int = PERTURB_LIMIT, seg_limit: int = SEG_LIMIT, batch_size: int = BATCH_SIZE,
            quiet: bool = True, methods=None, method_options: dict | None = None, precision: str = "float64",
            model: str = "embedded") -> dict:
    """Run both benchmarks on the embedded `model` and data for every method it can run (or
    `methods`, with `method_options`); return the numbers."""
    from transexplain.data.imagenet import ImageFolderDataset, Preprocess
    from transexplain.data.shapes import VERSION, embedded_paths
    from transexplain.evaluation.perturbation import run_perturbation
    from transexplain.evaluation.segmentation import SegmentationData, run_segmentation
    from transexplain.commands.common import resolve_methods
    from transexplain.models import as_adapter
    from transexplain.models.loading import load_model
    from transexplain.results import ResultStore

    loaded = load_model(model)
    paths = embedded_paths()
    methods = list(methods or resolve_methods("all", as_adapter(loaded.model)))
    pre = Preprocess(tuple(loaded.input_size[1:]), loaded.mean, loaded.std)
    numbers = {"model": model, "model_weights_hash": loaded.weights_hash, "data": VERSION, "perturb_limit": perturb_limit,
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
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    for name in (MODELS if args.model == "both" else [args.model]):
        spec = MODELS[name]
        numbers = compute(spec["perturb_limit"], spec["seg_limit"], quiet=not args.progress, model=name)
        numbers["tolerance"] = tolerance(spec["perturb_limit"])
        spec["file"].parent.mkdir(parents=True, exist_ok=True)
        spec["file"].write_text(json.dumps(numbers, indent=1) + "\n")
        print(json.dumps(numbers, indent=1))
        print(f"written to {spec['file']}")


if __name__ == "__main__":
    main()
