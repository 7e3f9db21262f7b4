"""Regression: the embedded default's perturbation and segmentation numbers stay where they were.

The expected numbers (configs/expected/embedded.json) come from scripts/make_expected.py; how
and why the tolerances were chosen is in configs/expected/README.md.
"""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ROOT / "configs" / "expected" / "embedded.json"
MODEL = ROOT / "transexplain" / "assets" / "embedded_vit" / "model.safetensors"

pytestmark = pytest.mark.slow


def _make_expected():
    spec = importlib.util.spec_from_file_location("make_expected", ROOT / "scripts" / "make_expected.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def expected():
    if not MODEL.exists():
        pytest.skip("the embedded model is not built (transexplain/assets/embedded_vit/model.safetensors): run scripts/train_embedded_vit.py")
    if not EXPECTED.exists():
        pytest.skip("configs/expected/embedded.json is missing: run `.venv/bin/python scripts/make_expected.py`")
    return json.loads(EXPECTED.read_text())


def test_embedded_numbers_match_the_expected_file(expected):
    from transexplain.models.loading import load_model

    current_hash = load_model("embedded").weights_hash
    if current_hash != expected["model_weights_hash"]:
        pytest.fail(f"the embedded model changed (weights {current_hash}, expected file made with "
                    f"{expected['model_weights_hash']}): regenerate with `.venv/bin/python scripts/make_expected.py`")
    got = _make_expected().compute(expected["perturb_limit"], expected["seg_limit"])
    tol = expected["tolerance"]
    problems = []
    if abs(got["clean_accuracy"] - expected["clean_accuracy"]) > tol["clean_accuracy"]:
        problems.append(f"clean accuracy {got['clean_accuracy']:.2f} vs {expected['clean_accuracy']:.2f}")
    for method, numbers in expected["methods"].items():
        for kind in ("perturbation_auc", "segmentation"):
            for key, want in numbers[kind].items():
                have = got["methods"][method][kind][key]
                if abs(have - want) > tol[kind]:
                    problems.append(f"{method} {kind} {key}: {have:.3f} vs expected {want:.3f} (tolerance {tol[kind]})")
    assert not problems, "numbers moved:\n" + "\n".join(problems)
