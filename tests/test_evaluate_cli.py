"""`tx-bench evaluate`: refusals before any work, a small run, its per-image store and its report."""
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ENTRY = Path(sys.executable).parent / "tx-bench"
if not ENTRY.exists():
    ENTRY = Path(shutil.which("tx-bench") or ENTRY)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def tx(*args):
    return subprocess.run([str(ENTRY), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=600)


def _one_sentence(proc):
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return len(lines) == 1 and "Traceback" not in proc.stderr


def test_mask_metric_on_data_without_masks_is_refused_before_any_work(tmp_path):
    from transexplain.data.shapes import embedded_paths

    out = tmp_path / "r.h5"
    proc = tx("evaluate", "--method", "rollout", "--metric", "deletion,pointing_game",
              "--data", embedded_paths()["val"], "--out", out)
    assert proc.returncode == 2, proc.stderr
    assert _one_sentence(proc) and "pointing_game" in proc.stderr and "masks" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("args,word", [(("--model", "embedded-text", "--metric", "road_morf"), "text model"),
                                       (("--metric", "nope"), "Unknown metric"),
                                       (("--model", "embedded-swin", "--method", "bt_h"), "no class token")])
def test_text_model_and_unknown_metric_are_refused(tmp_path, args, word):
    proc = tx("evaluate", "--method", "rollout", *args, "--out", tmp_path / "r.h5")
    assert proc.returncode == 2 and word in proc.stderr and _one_sentence(proc), proc.stderr
    assert not (tmp_path / "r.h5").exists()


def test_small_run_stores_per_image_values_and_reports(tmp_path):
    from transexplain.results import ResultStore

    out = tmp_path / "suite.h5"
    args = ("evaluate", "--method", "rollout,transformer_attribution", "--metric", "deletion,srg,saco,relevance_rank",
            "--limit", "3", "--batch-size", "2", "--out", out, "--quiet")
    proc = tx(*args)
    assert proc.returncode == 0, proc.stderr
    assert "| method | deletion ↓ | srg ↑ | saco ↑ | relevance_rank ↑ |" in proc.stdout
    assert "Kendall τ" in proc.stdout and "**" in proc.stdout
    store = ResultStore(out)
    assert store.is_complete and store.config["metrics"] == ["deletion", "srg", "saco", "relevance_rank"]
    assert store.done("images") == 3
    for method in ("rollout", "transformer_attribution"):
        assert store.read(f"{method}/deletion", "value").shape == (3,)
        assert store.read(f"{method}/deletion", "curve").shape == (3, 17)
        saco = store.read(f"{method}/saco", "value")
        assert all(-1 <= v <= 1 for v in saco if not math.isnan(v))
    # the summary is recomputed from the stored rows: the mean over the finite values
    from transexplain.evaluation.suite import summarise

    s = summarise(store, ["rollout"], ["deletion"])["rollout"]["deletion"]
    v = store.read("rollout/deletion", "value")
    assert s["mean"] == pytest.approx(np.nanmean(v)) and s["nan"] == int(np.isnan(v).sum())
    again = tx(*args)
    assert again.returncode == 0 and "already holds this complete run" in again.stdout
    csv = tx(*args[:-1], "--format", "csv")
    assert "rollout," in csv.stdout


def test_random_metrics_do_not_depend_on_the_batch_size_or_the_other_metrics(tmp_path):
    """ROAD's imputation noise, infidelity's and max-sensitivity's perturbations are drawn per image
    (seed, image index, method, metric): batch size 1 and 3, and ROAD alone, give the same values."""
    from transexplain.results import ResultStore

    def run(name, batch, metrics):
        out = tmp_path / name
        proc = tx("evaluate", "--method", "rollout", "--metric", metrics, "--limit", "3", "--batch-size", batch,
                  "--out", out, "--quiet")
        assert proc.returncode == 0, proc.stderr
        return ResultStore(out)

    all3 = "road_morf,infidelity,max_sensitivity"
    a, b, c = run("a.h5", 1, all3), run("b.h5", 3, all3), run("c.h5", 2, "road_morf")
    # the same noise; only the float64 forwards of the perturbed copies run in other batch compositions
    # (rounding ~1e-16, which infidelity's squared differences of near-equal numbers magnify): 1e-9 relative.
    # (Drawn per batch, as before, batch sizes 1 and 3 drew different noise for the same image.)
    for m in all3.split(","):
        assert np.allclose(a.read(f"rollout/{m}", "value"), b.read(f"rollout/{m}", "value"), rtol=1e-9, atol=0), m
    assert np.allclose(a.read("rollout/road_morf", "value"), c.read("rollout/road_morf", "value"), rtol=1e-9, atol=0)


def test_random_metrics_are_the_same_under_the_portable_cpu_kernels(tmp_path):
    """The noisy metrics end to end on another CPU kernel set (ATEN_CPU_CAPABILITY=default): the noise
    is counter-based (the same draws), so only the float64 forwards' rounding may differ."""
    from transexplain.results import ResultStore

    metrics = "road_morf,road_lerf,infidelity,max_sensitivity"
    stores = {}
    for name, extra in (("native", {}), ("default", {"ATEN_CPU_CAPABILITY": "default"})):
        out = tmp_path / f"{name}.h5"
        proc = subprocess.run([str(ENTRY), "evaluate", "--method", "rollout", "--metric", metrics, "--limit", "2",
                               "--out", str(out), "--quiet"], capture_output=True, text=True,
                              env={**ENV, **extra}, timeout=600)
        assert proc.returncode == 0, proc.stderr
        stores[name] = ResultStore(out)
    for m in metrics.split(","):
        a, b = (stores[k].read(f"rollout/{m}", "value") for k in ("native", "default"))
        assert np.all(np.isfinite(a)) and np.allclose(a, b, rtol=1e-9, atol=0), (m, a, b)


def test_a_file_whose_noise_came_from_another_generator_is_not_resumed(tmp_path):
    """A suite file written before the counter-based noise (its protocol has no "noise" entry) must not
    be extended with other draws: one sentence naming the setting, exit 2, the file unchanged."""
    import json

    import h5py

    out = tmp_path / "old.h5"
    proc = tx("evaluate", "--method", "rollout", "--metric", "infidelity", "--limit", "1", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out, "r+") as f:  # what a file of the previous generator holds
        config = json.loads(f.attrs["config"])
        assert config["protocol"]["noise"] == "splitmix64-boxmuller-v1"
        del config["protocol"]["noise"]
        f.attrs["config"] = json.dumps(config)
    before = out.read_bytes()
    proc = tx("evaluate", "--method", "rollout", "--metric", "infidelity", "--limit", "1", "--out", out, "--quiet")
    assert proc.returncode == 2 and _one_sentence(proc), proc.stderr
    assert "protocol.noise: absent in the file vs 'splitmix64-boxmuller-v1' now" in proc.stderr, proc.stderr
    assert "--overwrite" in proc.stderr
    assert out.read_bytes() == before
