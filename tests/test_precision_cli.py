"""`--precision` on every computing command: recorded in the results file, said by the report,
part of what a resume must match; and the batch size, recorded but free to change on resume."""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from test_vision_cli import make_checkpoint, make_gtsegs, make_image_folder, run, tx, tx_inprocess  # noqa: F401 (run: fixture)

ROOT = Path(__file__).resolve().parents[1]
TEXT_MODEL_READY = (ROOT / "transexplain" / "assets" / "embedded_text" / "head.safetensors").exists()


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision_cli")
    return {"ckpt": make_checkpoint(root / "ckpt"), "imgs": make_image_folder(root / "imgs"),
            "seg": make_gtsegs(root / "seg.mat", n=4)}


def _config(path):
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["config"]), json.loads(f.attrs.get("environment", "[]"))


def _spy_on_explain(monkeypatch):
    """Wrap transexplain.explain (and api.explain): record (precision asked, dtype of the adapter's model) per call."""
    import transexplain

    calls = []
    real = transexplain.explain

    def spy(model, images, *args, **kwargs):
        result = real(model, images, *args, **kwargs)
        calls.append((kwargs.get("precision"), result.logits.dtype))
        return result

    monkeypatch.setattr(transexplain, "explain", spy)
    monkeypatch.setattr(transexplain.api, "explain", spy)
    return calls


def test_float32_perturb_computes_in_float32_records_it_and_the_report_says_so(fixtures, tmp_path, run, monkeypatch):
    calls = _spy_on_explain(monkeypatch)
    out = tmp_path / "p32.h5"
    r = run("perturb", "--method", "transformer_attribution", "--data", fixtures["imgs"], "--model", fixtures["ckpt"],
            "--limit", 4, "--batch-size", 2, "--precision", "float32", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert calls and all(c == ("float32", torch.float32) for c in calls)
    config, envs = _config(out)
    assert config["precision"] == "float32" and config["batch_size"] == 2
    assert len(envs) == 1 and envs[0]["precision"] == "float32"
    assert "| precision float32 |" in r.stdout and "Environment: precision float32;" in r.stdout
    csv = run("report", out, "--format", "csv")
    assert csv.returncode == 0
    lines = csv.stdout.strip().splitlines()
    assert lines[0].startswith("AUC (%),Transformer Attribution")
    assert any(line.startswith("# Environment: precision float32;") for line in lines)


def test_default_precision_is_float64_everywhere(fixtures, tmp_path, run, monkeypatch):
    calls = _spy_on_explain(monkeypatch)
    out = tmp_path / "s.h5"
    r = run("segment", "--method", "rollout,full_lrp", "--data", fixtures["seg"], "--model", fixtures["ckpt"],
            "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert calls and all(c == ("float64", torch.float64) for c in calls)
    config, envs = _config(out)
    assert config["precision"] == "float64" and envs[0]["precision"] == "float64"
    latex = run("report", out, "--format", "latex")
    assert "% Environment: precision float64;" in latex.stdout and "precision float64" in latex.stdout.splitlines()[0]


def test_resume_with_another_precision_is_refused_in_one_sentence(fixtures, tmp_path, run):
    out = tmp_path / "p.h5"
    base = ["perturb", "--method", "rollout", "--data", fixtures["imgs"], "--model", fixtures["ckpt"], "--limit", 4,
            "--out", out, "--quiet"]
    assert run(*base, "--precision", "float32").returncode == 0
    before = out.read_bytes()
    r = run(*base)  # the default, float64
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert "precision: 'float32' in the file vs 'float64' now" in lines[0] and "--overwrite" in lines[0]
    assert out.read_bytes() == before
    assert _config(out)[0]["precision"] == "float32"
    assert run(*base, "--overwrite").returncode == 0 and _config(out)[0]["precision"] == "float64"


def test_unknown_precision_is_refused(fixtures, tmp_path, run):
    for command in (["perturb", "--data", fixtures["imgs"]], ["segment", "--data", fixtures["seg"]]):
        r = run(*command, "--method", "rollout", "--model", fixtures["ckpt"], "--precision", "float8",
                "--out", tmp_path / "x.h5")
        assert r.returncode == 2 and "Unknown precision 'float8'" in r.stderr
        assert not (tmp_path / "x.h5").exists()
    r = run("explain", "--precision", "half", "--model", fixtures["ckpt"], tmp_path / "none.png")
    assert r.returncode == 2 and "Unknown precision 'half'" in r.stderr


def test_explain_writes_maps_in_the_precision_asked(fixtures, tmp_path, run):
    from PIL import Image

    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    for precision, dtype in (("float32", np.float32), (None, np.float64)):
        out = tmp_path / f"out_{precision}"
        extra = ["--precision", precision] if precision else []
        r = run("explain", image, "--model", fixtures["ckpt"], "--method", "full_lrp", "--out", out, *extra)
        assert r.returncode == 0, r.stderr
        assert np.load(out / "a.full_lrp.npy").dtype == dtype


def test_float64_numbers_do_not_depend_on_the_batch_size_which_is_recorded(fixtures, tmp_path, run):
    hits = {}
    for batch in (2, 3):
        out = tmp_path / f"b{batch}.h5"
        r = run("perturb", "--method", "full_lrp", "--test", "negative", "--data", fixtures["imgs"], "--model",
                fixtures["ckpt"], "--limit", 6, "--batch-size", batch, "--out", out, "--quiet")
        assert r.returncode == 0, r.stderr
        assert _config(out)[0]["batch_size"] == batch and f"| batch size {batch}" in r.stdout
        with h5py.File(out, "r") as f:
            hits[batch] = f["full_lrp/pred/negative/hits"][:]
    assert np.array_equal(hits[2], hits[3])


def test_resume_at_another_batch_size_is_allowed_and_keeps_both(fixtures, tmp_path):
    out = tmp_path / "k.h5"
    base = ["perturb", "--method", "rollout", "--data", fixtures["imgs"], "--model", fixtures["ckpt"], "--limit", 6,
            "--out", out, "--quiet"]
    killed = tx(*base, "--batch-size", 2, extra_env={"TX_BENCH_KILL_AFTER_BATCH": "1"})
    assert killed.returncode != 0
    assert _config(out)[0]["batch_size"] == 2
    resumed = tx(*base, "--batch-size", 4)
    assert resumed.returncode == 0, resumed.stderr
    assert "| batch size 2, 4" in resumed.stdout
    config, envs = _config(out)
    assert config["batch_size"] == [2, 4] and len(envs) == 1
    # showing the finished run again (another batch size, nothing computed) records nothing new
    shown = tx(*base, "--batch-size", 5)
    assert shown.returncode == 0 and "already holds this complete run" in shown.stdout
    assert _config(out)[0]["batch_size"] == [2, 4]


@pytest.mark.skipif(not TEXT_MODEL_READY, reason="the embedded text model is not built (scripts/train_embedded_text.py)")
def test_text_commands_take_the_precision(tmp_path, run, monkeypatch):
    calls = _spy_on_explain(monkeypatch)
    r = run("explain", "--text", "a wonderful and moving film .", "--method", "partial_lrp", "--precision", "float32")
    assert r.returncode == 0, r.stderr
    assert calls == [("float32", torch.float32)]
    out = tmp_path / "e.h5"
    r = run("eraser", "--limit", 2, "--method", "rollout", "--no-faithfulness", "--precision", "float32", "--out", out,
            "--quiet")
    assert r.returncode == 0, r.stderr
    config, envs = _config(out)
    assert config["precision"] == "float32" and envs and envs[-1]["precision"] == "float32"
    rep = run("report", out)
    assert rep.returncode == 0 and "Environment: precision float32;" in rep.stdout
    again = run("eraser", "--limit", 2, "--method", "rollout", "--no-faithfulness", "--out", out, "--quiet")
    assert again.returncode == 2 and "precision" in again.stderr and "--overwrite" in again.stderr


def test_bfloat16_runs_the_forwards_under_autocast_and_is_recorded(fixtures, tmp_path, run):
    """--precision bfloat16 (perturb): recorded in the file; a gradient method and a relevance method
    both run (the relevance maps in float32, docs/numerics.md)."""
    out = tmp_path / "bf16.h5"
    r = run("perturb", "--data", fixtures["imgs"], "--method", "rollout,transformer_attribution", "--model",
            fixtures["ckpt"], "--precision", "bfloat16", "--limit", 4, "--out", out, "--quiet", "--save-maps")
    assert r.returncode == 0, r.stderr
    assert _config(out)[0]["precision"] == "bfloat16"
    with h5py.File(out, "r") as f:
        assert f["transformer_attribution/pred/positive/hits"].shape == (4, 10)
        assert np.isfinite(f["rollout/pred/map"][:].astype(np.float32)).all()
