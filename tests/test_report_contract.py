"""The CLI contract of the image benchmarks and `report` (docs/cli.md): one header line and one
resume message, report formats (markdown, CSV with every table, LaTeX with booktabs and a caption,
JSON), several result files in one table, n/a for missing numbers, the paper's row order, the
unreadable images listed beside the result, and `methods` naming the aliases."""
import json
import shutil

import h5py
import pytest

from test_vision_cli import make_checkpoint, make_gtsegs, make_image_folder, run, tx  # noqa: F401


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    return {"ckpt": make_checkpoint(root / "ckpt"), "imgs": make_image_folder(root / "imgs"),
            "seg": make_gtsegs(root / "seg.mat"), "root": root}


def _perturb(data, out, method, *extra):
    return ["perturb", "--method", method, "--data", data["imgs"], "--model", data["ckpt"], "--limit", 8,
            "--batch-size", 4, "--out", out, "--quiet", *extra]


def _row(text, label):
    return [c.strip() for c in [line for line in text.splitlines() if line.startswith(f"| {label}")][0].strip("|").split("|")]


def test_one_file_per_method_reports_as_one_table(data, tmp_path, run):
    a, b = tmp_path / "perturb_rollout.h5", tmp_path / "perturb_gradcam.h5"
    assert run(*_perturb(data, a, "rollout")).returncode == 0
    assert run(*_perturb(data, b, "gradcam")).returncode == 0
    single = {m: _row(run("report", p).stdout, "Negative, predicted")[1] for m, p in (("rollout", a), ("gradcam", b))}
    both = run("report", b, a)
    assert both.returncode == 0, both.stderr
    assert both.stdout.count("| AUC (%)") == 1
    header = [line for line in both.stdout.splitlines() if line.startswith("| AUC (%)")][0]
    assert header == "| AUC (%) | rollout | GradCAM |"  # the paper's column order, whatever the file order
    assert _row(both.stdout, "Negative, predicted")[1:] == [single["rollout"], single["gradcam"]]
    twice = run("report", a, a)
    assert twice.returncode == 2 and "rollout is in both" in twice.stderr


def test_json_csv_and_latex_carry_every_table_and_the_same_numbers(data, tmp_path, run):
    p, s = tmp_path / "p.h5", tmp_path / "s.h5"
    assert run(*_perturb(data, p, "rollout,transformer_attribution")).returncode == 0
    assert run("segment", "--method", "rollout", "--data", data["seg"], "--model", data["ckpt"], "--out", s,
               "--quiet").returncode == 0
    md = run("report", p, s).stdout
    js = run("report", p, s, "--format", "json")
    assert js.returncode == 0, js.stderr
    tables = json.loads(js.stdout)["tables"]
    assert [t["benchmark"] for t in tables] == ["perturbation", "segmentation"]
    for t in tables:
        for row in t["rows"]:
            for method, value in row["values"].items():
                shown = _row(md, row["label"])[1 + t["methods"].index(method)]
                assert shown == ("n/a" if value is None else f"{value:.2f}")
    assert [r["key"] for r in tables[1]["rows"]] == ["pixel_accuracy", "miou", "map"]  # the paper's order
    csv = run("report", p, s, "--format", "csv").stdout
    assert "AUC (%),rollout,Transformer Attribution" in csv and "Segmentation (%),rollout" in csv
    body = [line for line in csv.splitlines() if line and not line.startswith("#")]
    assert [line.split(",")[0] for line in body if line.startswith(("Pixel", "mIoU", "mAP"))] == ["Pixel accuracy", "mIoU", "mAP"]
    tex = run("report", p, s, "--format", "latex").stdout
    assert tex.count(r"\toprule") == 2 and tex.count(r"\caption{") == 2 and "booktabs" in tex
    assert run("report", p, "--format", "yaml").returncode == 2


def test_missing_numbers_are_n_a_in_every_format(data, tmp_path, run):
    from transexplain.results import ResultStore

    path = tmp_path / "gap.h5"
    store = ResultStore(path, {"benchmark": "segmentation", "methods": ["rollout", "gradcam"]})
    store.set_summary("rollout", {"pixel_accuracy": 50.0, "miou": float("nan"), "map": 40.0, "n": 3})
    store.mark_complete()
    store.close()
    md = run("report", path).stdout
    assert _row(md, "mIoU")[1:] == ["n/a", "n/a"] and _row(md, "Pixel accuracy")[1:] == ["50.00", "n/a"]
    assert "nan" not in run("report", path, "--format", "csv").stdout.lower().replace("n/a", "")
    assert json.loads(run("report", path, "--format", "json").stdout)["tables"][0]["rows"][1]["values"] == {"rollout": None, "gradcam": None}


def test_header_line_and_resume_message(data, tmp_path, run):
    out = tmp_path / "p.h5"
    killed = tx(*_perturb(data, out, "rollout"), extra_env={"TX_BENCH_KILL_AFTER_BATCH": "1"})
    assert killed.returncode < 0
    first = killed.stdout.splitlines()[0]
    assert first.startswith("perturbation | model vit_tiny_patch16_224 | weights checkpoint:") and first.endswith("| 8 images")
    assert f"| data {data['imgs'].resolve()} |" in first
    resumed = run(*_perturb(data, out, "rollout"))
    assert resumed.returncode == 0
    assert resumed.stdout.splitlines()[0] == first
    assert f"Resuming {out} at image 4 of 8." in resumed.stdout.splitlines()


def test_unreadable_images_are_listed_beside_the_result(data, tmp_path, run):
    imgs = shutil.copytree(data["imgs"], tmp_path / "imgs")
    (imgs / "class01" / "img0.png").write_bytes(b"not a png")
    (imgs / "class02" / "img0.png").write_bytes(b"not a png either")
    out = tmp_path / "results" / "perturb_rollout.h5"
    r = run("perturb", "--method", "rollout", "--data", imgs, "--model", data["ckpt"], "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    listed = tmp_path / "results" / "perturb_rollout.skipped.txt"
    assert listed.read_text().splitlines() == ["class01/img0.png", "class02/img0.png"]
    assert str(listed) in r.stdout
    with h5py.File(out, "r") as f:
        assert f["skipped/name"].shape == (2,)
    clean = tmp_path / "results" / "other.h5"
    assert run(*_perturb(data, clean, "rollout")).returncode == 0
    assert not (tmp_path / "results" / "other.skipped.txt").exists()


def test_methods_lists_the_aliases(run):
    from transexplain.explainers import get_method, method_names

    out = run("methods").stdout.split("\n\n")[0].splitlines()  # the list, before the support matrix
    for name in method_names():
        line = [line for line in out if line.split()[0] == name][0]
        for alias in get_method(name).aliases:
            assert alias in line
    assert any(get_method(n).aliases for n in method_names())
