"""`tx-bench eraser` and `tx-bench explain --text` end to end, bad inputs, and the regression numbers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = ROOT / "configs" / "expected" / "embedded_text.json"
#: the methods whose ERASER comprehensiveness / sufficiency the regression re-runs in CI
FAITHFULNESS_IN_CI = ("transformer_attribution", "attnlrp")
MODEL_READY = (ROOT / "transexplain" / "assets" / "embedded_text" / "head.safetensors").exists()
needs_model = pytest.mark.skipif(not MODEL_READY, reason="the embedded text model is not built (scripts/train_embedded_text.py)")


def tx(*args, cwd=None, **extra_env):
    exe = Path(sys.executable).parent / "tx-bench"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "transexplain.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **extra_env}
    env.pop("NO_COLOR", None)
    return subprocess.run(cmd + list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@needs_model
def test_eraser_end_to_end_and_report(tmp_path):
    out = tmp_path / "tmp.h5"
    r = tx("eraser", "--limit", "4", "--method", "transformer_attribution", "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "embedded" in r.stdout and "Transformer Attribution" in r.stdout
    from transexplain.evaluation.eraser import plot, report_text
    from transexplain.results.store import ResultStore

    store = ResultStore(out)
    assert store.benchmark == "eraser" and store.is_complete
    assert store.summary("transformer_attribution")["documents"] == 4
    md = report_text(out, "markdown")
    assert "| token_f1_macro at k | Transformer Attribution |" in md and "| 80 |" in md and "| auprc |" in md
    csv = report_text(out, "csv").splitlines()  # every row names its metric
    assert csv[0] == "metric,k,Transformer Attribution" and csv[1].startswith("token_f1_macro,5,")
    assert any(r.startswith("iou_f1,,") for r in csv) and any(r.startswith("average_precision,,") for r in csv)
    assert "\\begin{tabular}" in report_text(out, "latex")
    plot(out, tmp_path / "f1.png")
    assert (tmp_path / "f1.png").stat().st_size > 1000
    # a second run with the same settings resumes (nothing left to do); other settings need --overwrite
    r2 = tx("eraser", "--limit", "4", "--method", "transformer_attribution", "--out", str(out), "--quiet")
    assert r2.returncode == 0, r2.stderr
    r3 = tx("eraser", "--limit", "3", "--method", "transformer_attribution", "--out", str(out), "--quiet")
    assert r3.returncode == 2 and "--overwrite" in r3.stderr


@needs_model
def test_explain_text_terminal_and_html(tmp_path):
    page = tmp_path / "t.html"
    text = "the plot is thin but the acting is wonderful and moving ."
    r = tx("explain", "--text", text, "--html", str(page), FORCE_COLOR="1")
    assert r.returncode == 0, r.stderr
    assert "\x1b[48;5;" in r.stdout and "predicted class: POS" in r.stdout
    plain = tx("explain", "--text", text, "--method", "gradcam", "--target", "0")
    assert plain.returncode == 0, plain.stderr
    assert "wonderful[" in plain.stdout and "explained class: NEG" in plain.stdout and "\x1b[" not in plain.stdout
    html = page.read_text()
    assert "<span" in html and "wonderful" in html and "POS" in html


def test_bad_inputs_exit_2_with_one_sentence(tmp_path):
    cases = [
        (("eraser", "--method", "rollout", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "a.h5")), "does not exist"),
        (("eraser", "--method", "rollout", "--precision", "float16", "--out", str(tmp_path / "b.h5")), "Unknown precision"),
        (("eraser", "--method", "nonsense", "--out", str(tmp_path / "c.h5")), "Unknown method"),
        (("explain", "--text", "   "), "empty"),
    ]
    for args, needle in cases:
        r = tx(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        err = r.stderr.strip()
        assert err.startswith("Error: ") and needle in err and "Traceback" not in err
        assert len(err.splitlines()) == 1


def test_eraser_limit_out_of_range_is_a_usage_error():
    r = tx("eraser", "--method", "rollout", "--limit", "0")
    assert r.returncode == 2 and "--limit" in r.stderr and "Usage:" in r.stderr and "--debug" not in r.stderr


@needs_model
def test_every_method_the_text_model_runs_is_regressed():
    """A method added to the registry must get expected ERASER numbers (scripts/train_embedded_text.py --expected-only)."""
    from transexplain.commands.common import resolve_methods
    from transexplain.models.text import TextAdapter, load_text_model

    model, _ = load_text_model("embedded")
    missing = [m for m in resolve_methods("all", TextAdapter(model)) if m not in json.loads(EXPECTED.read_text())["methods"]]
    assert not missing, f"no expected ERASER numbers for {missing}: run scripts/train_embedded_text.py --expected-only"


@needs_model
def test_regression_against_expected_numbers(tmp_path):
    """The embedded default must reproduce configs/expected/embedded_text.json within its tolerance."""
    import torch

    from transexplain.data.eraser import read_eraser
    from transexplain.data.reviews import ensure_reviews
    from transexplain.evaluation.eraser import run_eraser
    from transexplain.models.text import load_text_model

    spec = json.loads(EXPECTED.read_text())
    tol = spec["tolerance"]
    examples = read_eraser(ensure_reviews(0), spec["split"], limit=spec["documents"])
    torch.manual_seed(0)
    model, tok = load_text_model("embedded")
    # comprehensiveness / sufficiency cost 10 forwards per document and method (more than doubling this
    # test's CPU time for all methods): they are re-run for FAITHFULNESS_IN_CI, a cheap LRP-rule method,
    # the paper's method, and compared for those
    faithful = [m for m in spec["methods"] if spec["faithfulness_in_ci"] or m in FAITHFULNESS_IN_CI]
    rest = [m for m in spec["methods"] if m not in faithful]
    sums = {}
    for methods, faithfulness, name in ((faithful, True, "f.h5"), (rest, False, "r.h5")):
        if methods:
            sums.update(run_eraser(examples, model, tok, methods, tmp_path / name, {"test": "regression"},
                                   batch_size=spec["batch_size"], quiet=True, faithfulness=faithfulness))
    for method, expected in spec["methods"].items():
        got = sums[method]
        f1 = dict(zip(got["k"], got["token_f1_macro"]))
        for k, value in expected["token_f1_macro"].items():
            assert f1[int(k)] == pytest.approx(value, abs=tol), (method, k)
        keys = ("iou_f1", "iou_f1_corrected", "auprc", "average_precision", "accuracy") + (("comprehensiveness_aopc", "sufficiency_aopc") if method in faithful else ())
        for key in keys:
            assert got[key] == pytest.approx(expected[key], abs=tol), (method, key)
