"""`tx-bench perturb / segment / report` end to end in a subprocess, on a tiny checkpoint and tiny data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TX_BENCH = ROOT / ".venv" / "bin" / "tx-bench"
TINY_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


def make_checkpoint(directory: Path, num_classes: int = 4, seed: int = 0) -> Path:
    """A random-weight 2-block ViT at 32x32 saved the way load_model reads checkpoints."""
    import timm
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=num_classes, **TINY_KWARGS)
    with torch.no_grad():  # larger weights so that predictions differ between images
        for name, p in model.named_parameters():
            if not name.endswith("weight") or "norm" not in name:
                p.copy_(0.3 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({
        "architecture": "vit_tiny_patch16_224", "model_kwargs": TINY_KWARGS, "num_classes": num_classes,
        "input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}))
    return directory


def make_image_folder(root: Path, classes: int = 4, per_class: int = 6, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (36, 44, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / f"class{c:02d}" / f"img{i}.png")
    return root


def make_gtsegs(path: Path, n: int = 10, seed: int = 0) -> Path:
    from transexplain.data.gtsegs import write_gtsegs

    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(n)]
    masks = []
    for _ in range(n):
        m = np.zeros((40, 30), dtype=np.uint8)
        y, x = rng.integers(0, 20), rng.integers(0, 15)
        m[y:y + 15, x:x + 12] = 1
        masks.append(m)
    return write_gtsegs(path, images, masks)


def env(**extra):
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", **extra)
    e.pop("TX_BENCH_DEBUG", None)
    return e


def tx(*args, extra_env=None, timeout=300):
    cmd = [str(TX_BENCH)] if TX_BENCH.exists() else [sys.executable, "-m", "transexplain.cli"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, cwd=ROOT,
                          env=env(**(extra_env or {})), timeout=timeout)


def tx_inprocess(*args, capsys=None):
    """Run `tx-bench args` through cli.main in this process (same exit codes and messages, no start-up cost)."""
    from transexplain import cli

    old = sys.argv
    sys.argv = ["tx-bench"] + [str(a) for a in args]
    code = 0
    try:
        cli.main()
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else 1
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.fixture
def run(capsys, monkeypatch):
    monkeypatch.delenv("TX_BENCH_DEBUG", raising=False)
    return lambda *args: tx_inprocess(*args, capsys=capsys)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision_cli")
    return {"ckpt": make_checkpoint(root / "ckpt"), "imgs": make_image_folder(root / "imgs"),
            "seg": make_gtsegs(root / "seg.mat"), "root": root}


def test_perturb_end_to_end_writes_a_complete_file_and_a_table(fixtures, tmp_path, run):
    out = tmp_path / "p.h5"
    r = tx("perturb", "--method", "rollout,transformer_attribution", "--target", "both", "--data", fixtures["imgs"],
           "--model", fixtures["ckpt"], "--limit", 8, "--batch-size", 4, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "| Negative, predicted |" in r.stdout and "Transformer Attribution" in r.stdout
    assert "(" not in r.stdout.split("| AUC (%)")[1].split("\n")[2]  # no paper numbers on a toy run
    with h5py.File(out, "r") as f:
        assert f.attrs["benchmark"] == "perturbation" and bool(f.attrs["complete"])
        config = json.loads(f.attrs["config"])
        assert config["methods"] == ["rollout", "transformer_attribution"] and config["limit"] == 8
        assert config["version"]
        hits = f["transformer_attribution/true/positive/hits"][:]
        assert hits.shape == (8, 10) and hits.dtype == bool
        # column 0 is the clean image: the same for every method, test and target
        assert np.array_equal(hits[:, 0], f["clean/hit"][:])
        summary = json.loads(f["rollout/pred/negative"].attrs["summary"])
        assert len(summary["curve"]) == 10 and summary["n"] == 8
    rep = tx("report", out, "--format", "csv", "--plot", tmp_path / "c.png")
    assert rep.returncode == 0, rep.stderr
    assert rep.stdout.splitlines()[0].startswith("AUC (%),rollout,Transformer Attribution")
    assert (tmp_path / "c.png").stat().st_size > 1000
    again = run("perturb", "--method", "rollout,transformer_attribution", "--target", "both", "--data", fixtures["imgs"],
               "--model", fixtures["ckpt"], "--limit", 8, "--out", out, "--quiet")
    assert again.returncode == 0 and "already holds this complete run" in again.stdout


def test_segment_end_to_end(fixtures, tmp_path, run):
    out = tmp_path / "s.h5"
    r = tx("segment", "--method", "all", "--data", fixtures["seg"], "--model", fixtures["ckpt"], "--batch-size", 4,
           "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "| Pixel accuracy |" in r.stdout and "| mIoU |" in r.stdout
    with h5py.File(out, "r") as f:
        assert f.attrs["benchmark"] == "segmentation" and bool(f.attrs["complete"])
        s = json.loads(f["rollout"].attrs["summary"])
        assert s["n"] == 10 and 0 <= s["pixel_accuracy"] <= 100 and 0 <= s["miou"] <= 100 and 0 <= s["map"] <= 100
        assert f["rollout/inter"].shape == (10, 2)
    latex = run("report", out, "--format", "latex")
    assert latex.returncode == 0 and r"\begin{tabular}" in latex.stdout


def _error(r):
    lines = [line for line in r.stderr.strip().splitlines() if line]
    return lines[-1] if lines else ""


def test_missing_data_path_is_one_sentence(fixtures, tmp_path):
    r = tx("perturb", "--method", "rollout", "--data", tmp_path / "nowhere", "--model", fixtures["ckpt"], "--out", tmp_path / "x.h5")
    assert r.returncode == 2
    assert _error(r).startswith("Error: The data path") and "does not exist" in _error(r)
    assert "Traceback" not in r.stderr and not (tmp_path / "x.h5").exists()


def test_class_count_mismatch_is_refused_before_writing(fixtures, tmp_path, run):
    imgs = make_image_folder(tmp_path / "twelve", classes=12, per_class=1)
    r = run("perturb", "--method", "rollout", "--data", imgs, "--model", fixtures["ckpt"], "--out", tmp_path / "x.h5")
    assert r.returncode == 2 and "12 class folders but the model has 4 classes" in r.stderr
    assert not (tmp_path / "x.h5").exists()


def test_mat_file_without_gtsegs_layout(fixtures, tmp_path, run):
    bad = tmp_path / "bad.mat"
    with h5py.File(bad, "w") as f:
        f.create_dataset("something", data=np.zeros(3))
    r = run("segment", "--method", "rollout", "--data", bad, "--model", fixtures["ckpt"], "--out", tmp_path / "x.h5")
    assert r.returncode == 2 and "gtsegs_ijcv.mat layout" in r.stderr
    not_hdf5 = tmp_path / "text.mat"
    not_hdf5.write_text("hello")
    r = run("segment", "--method", "rollout", "--data", not_hdf5, "--model", fixtures["ckpt"], "--out", tmp_path / "x.h5")
    assert r.returncode == 2 and "not a MATLAB v7.3" in r.stderr
    assert not (tmp_path / "x.h5").exists()


def test_undecodable_image_is_skipped_and_counted(fixtures, tmp_path, run):
    import shutil

    imgs = shutil.copytree(fixtures["imgs"], tmp_path / "imgs")
    (imgs / "class00" / "img0.png").write_bytes(b"not a png")
    out = tmp_path / "p.h5"
    r = run("perturb", "--method", "rollout", "--data", imgs, "--model", fixtures["ckpt"], "--limit", 8, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "1 skipped (unreadable)" in r.stdout
    with h5py.File(out, "r") as f:
        assert f["clean/hit"].shape == (7,) and json.loads(f["clean"].attrs["summary"])["skipped_names"] == ["class00/img0.png"]


def test_config_mismatch_refused_then_overwrite(fixtures, tmp_path, run):
    out = tmp_path / "p.h5"
    base = ["perturb", "--data", fixtures["imgs"], "--model", fixtures["ckpt"], "--limit", 4, "--out", out, "--quiet"]
    assert run(*base, "--method", "rollout").returncode == 0
    r = run(*base, "--method", "raw_attention")
    assert r.returncode == 2 and "different settings" in r.stderr and "--overwrite" in r.stderr
    r = run(*base, "--method", "raw_attention", "--overwrite")
    assert r.returncode == 0
    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs["config"])["methods"] == ["raw_attention"]


def test_damaged_results_file_suggests_overwrite(fixtures, tmp_path, run):
    out = tmp_path / "p.h5"
    out.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 100)
    r = run("perturb", "--method", "rollout", "--data", fixtures["imgs"], "--model", fixtures["ckpt"], "--limit", 4, "--out", out)
    assert r.returncode == 2 and "damaged" in r.stderr and "--overwrite" in r.stderr
    r = run("report", out)
    assert r.returncode == 2 and "damaged" in r.stderr


def test_bad_options(fixtures, tmp_path, run):
    r = run("perturb", "--method", "nonsense", "--data", fixtures["imgs"], "--model", fixtures["ckpt"])
    assert r.returncode == 2 and "Unknown method 'nonsense'" in r.stderr
    r = run("perturb", "--method", "rollout", "--test", "sideways", "--data", fixtures["imgs"], "--model", fixtures["ckpt"])
    assert r.returncode == 2 and "Unknown --test" in r.stderr
    r = run("report", tmp_path / "missing.h5")
    assert r.returncode == 2 and "No results file" in r.stderr


def test_report_puts_the_paper_numbers_beside_ours_only_for_the_paper_protocol(tmp_path, run):
    from transexplain.results import ResultStore

    base = {"benchmark": "perturbation", "methods": ["rollout", "transformer_attribution"], "tests": ["negative"],
            "targets": ["pred"], "input_size": [3, 224, 224], "crop": False, "limit": None,
            "model": "vit_base_patch16_224.orig_in21k_ft_in1k", "model_source": "timm:vit_base_patch16_224.orig_in21k_ft_in1k",
            "architecture": "vit_base_patch16_224", "pretrained_tag": "orig_in21k_ft_in1k"}
    for source, expect_paper in (("user", True), ("embedded", False)):
        path = tmp_path / f"{source}.h5"
        store = ResultStore(path, {**base, "data_source": source})
        store.set_summary("rollout/pred/negative", {"auc": 50.0, "curve": [0.5] * 10})
        store.set_summary("transformer_attribution/pred/negative", {"auc": 51.25, "curve": [0.5] * 10})
        store.mark_complete()
        r = run("report", path)
        assert r.returncode == 0, r.stderr
        row = [line for line in r.stdout.splitlines() if line.startswith("| Negative, predicted")][0]
        if expect_paper:
            assert row == "| Negative, predicted | 50.00 (53.10) | 51.25 (54.16) |"
        else:
            assert row == "| Negative, predicted | 50.00 | 51.25 |"


def test_report_hands_eraser_files_to_the_eraser_module(tmp_path, run, monkeypatch):
    import types

    from transexplain.results import ResultStore

    path = tmp_path / "e.h5"
    ResultStore(path, {"benchmark": "eraser"}).mark_complete()
    fake = types.ModuleType("transexplain.evaluation.eraser")
    fake.report_text = lambda p, fmt: f"ERASER TABLE {fmt}"
    fake.plot = lambda p, png: open(png, "wb").write(b"png")
    monkeypatch.setitem(sys.modules, "transexplain.evaluation.eraser", fake)
    import transexplain.evaluation as evaluation

    monkeypatch.setattr(evaluation, "eraser", fake, raising=False)
    r = run("report", path, "--format", "csv", "--plot", tmp_path / "e.png")
    assert r.returncode == 0 and "ERASER TABLE csv" in r.stdout and (tmp_path / "e.png").exists()


@pytest.mark.parametrize("bench", ["perturb", "segment"])
def test_save_maps_is_part_of_the_run_settings(fixtures, tmp_path, run, bench):
    """--save-maps added on a resume used to store all-zero maps for the images done before (and
    to do nothing on a complete run): a resume that changes it is refused like any other setting."""
    out = tmp_path / f"{bench}.h5"
    data = fixtures["imgs"] if bench == "perturb" else fixtures["seg"]
    base = [bench, "--method", "rollout", "--data", data, "--model", fixtures["ckpt"], "--limit", 8,
            "--batch-size", 4, "--out", out, "--quiet"]
    killed = tx(*base, extra_env={"TX_BENCH_KILL_AFTER_BATCH": "1"})
    assert killed.returncode < 0
    group = "rollout/pred" if bench == "perturb" else "rollout"
    resumed = run(*base, "--save-maps")
    assert resumed.returncode == 2 and "save_maps: False in the file vs True now" in resumed.stderr
    with h5py.File(out, "r") as f:
        assert "map" not in f[group] and not f.attrs["complete"]
    assert run(*base).returncode == 0  # the same settings resume and finish
    complete = run(*base, "--save-maps")
    assert complete.returncode == 2 and "save_maps" in complete.stderr
    # a run that asks for the maps from the start stores a real map for every image
    with_maps = tmp_path / f"{bench}_maps.h5"
    assert tx(*base[:-3], "--out", with_maps, "--save-maps", "--quiet",
              extra_env={"TX_BENCH_KILL_AFTER_BATCH": "1"}).returncode < 0
    assert run(*base[:-3], "--out", with_maps, "--save-maps", "--quiet").returncode == 0
    with h5py.File(with_maps, "r") as f:
        maps = f[group]["map"][:]
        assert json.loads(f.attrs["config"])["save_maps"] is True
    assert maps.shape[0] == 8 and all(np.ptp(m.astype(np.float32)) > 0 for m in maps)


def _cells(line: str) -> list:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_report_of_an_interrupted_run_shows_the_numbers_so_far_marked_partial(fixtures, tmp_path, run):
    """`report` on a killed run used to say "numbers cover the images done so far" and show n/a everywhere."""
    from transexplain.evaluation.metrics import accuracy_curve, perturbation_auc

    out = tmp_path / "p.h5"
    killed = tx("perturb", "--method", "rollout,transformer_attribution", "--test", "both", "--data", fixtures["imgs"],
                "--model", fixtures["ckpt"], "--limit", 12, "--batch-size", 4, "--out", out, "--quiet",
                extra_env={"TX_BENCH_KILL_AFTER_BATCH": "2"})
    assert killed.returncode < 0
    before = out.read_bytes()
    with h5py.File(out, "r") as f:
        expected = {(m, t): perturbation_auc(accuracy_curve(f[f"{m}/pred/{t}/hits"][:8]))
                    for m in ("rollout", "transformer_attribution") for t in ("negative", "positive")}
    md = run("report", out)
    assert md.returncode == 0, md.stderr
    assert "partial: 8 of 12 images done so far" in md.stdout and "PARTIAL" in md.stdout
    rows = {line.split("|")[1].strip(): _cells(line)[1:] for line in md.stdout.splitlines() if line.startswith("| Negative") or line.startswith("| Positive")}
    for test in ("negative", "positive"):
        got = rows[f"{test.capitalize()}, predicted"]
        assert got == [f"{expected[(m, test)]:.2f}" for m in ("rollout", "transformer_attribution")]
    csv = run("report", out, "--format", "csv")
    assert csv.returncode == 0 and "partial: 8 of 12" in csv.stdout.splitlines()[0]
    assert "n/a" not in csv.stdout.split("\n#")[0]
    latex = run("report", out, "--format", "latex")
    assert latex.returncode == 0 and "PARTIAL" in latex.stdout.split(r"\caption{")[1] and "n/a" not in latex.stdout
    png = tmp_path / "c.png"
    assert run("report", out, "--plot", png).returncode == 0
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    blue = np.abs(pixels - np.array([31, 119, 180])).sum(axis=1) < 30  # matplotlib's first line colour
    assert blue.sum() > 50  # curves drawn, not empty axes
    assert out.read_bytes() == before  # the report wrote nothing into the run's file


def test_report_of_an_interrupted_segmentation_run(fixtures, tmp_path, run):
    from transexplain.evaluation.metrics import mean_iou

    out = tmp_path / "s.h5"
    killed = tx("segment", "--method", "rollout", "--data", fixtures["seg"], "--model", fixtures["ckpt"],
                "--batch-size", 4, "--out", out, "--quiet", extra_env={"TX_BENCH_KILL_AFTER_BATCH": "1"})
    assert killed.returncode < 0
    with h5py.File(out, "r") as f:
        miou = mean_iou(f["rollout/inter"][:4], f["rollout/union"][:4])
    md = run("report", out)
    assert md.returncode == 0, md.stderr
    row = [_cells(line) for line in md.stdout.splitlines() if line.startswith("| mIoU")][0]
    assert row[1] == f"{miou:.2f}" and "partial: 4 images done so far" in md.stdout
