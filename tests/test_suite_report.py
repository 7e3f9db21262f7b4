"""`tx-bench report` on a metric-suite file (`tx-bench evaluate`): the method x metric table and the
rank-agreement table in every format, `--plot` writing one PNG per curve metric and the heatmap,
the plotted curves equal to the mean of the stored per-image curves (read back with h5py and
averaged with numpy here), and a file from before srg / aopc / abpc stored curves."""
import json

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from transexplain.cli import app

CURVES = "insertion,deletion,srg,aopc,abpc,road_morf"
METRICS = CURVES + ",saco,pointing_game"


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite") / "suite.h5"
    invoke("evaluate", "--method", "rollout,random", "--metric", METRICS, "--limit", 3, "--batch-size", 2,
           "--out", out, "--quiet")
    return out


def _committed(f, group, name):
    rows = json.loads(f.attrs["commit"])["rows"][group]
    return f[group][name][:rows]


def test_report_prints_both_tables_in_every_format(suite_file):
    md = invoke("report", suite_file)
    assert "| method | insertion ↑ | deletion ↓ | srg ↑ | aopc ↑ | abpc ↑ | road_morf ↓ | saco ↑ | pointing_game ↑ |" in md
    assert "| Kendall τ | insertion |" in md and "**" in md
    assert md.startswith("suite | model")
    csv = invoke("report", suite_file, "--format", "csv")
    assert "method,insertion ↑,deletion ↓" in csv and "rollout," in csv and "random," in csv
    assert "Kendall τ,insertion" in csv and "*" in csv
    latex = invoke("report", suite_file, "--format", "latex")
    assert latex.count(r"\begin{tabular}") == 2 and r"\textbf{" in latex and r"$\uparrow$" in latex
    data = json.loads(invoke("report", suite_file, "--format", "json"))
    table = data["tables"][0]
    assert table["benchmark"] == "suite" and table["methods"] == ["rollout", "random"]
    assert len(table["rank_agreement"]) == 8 and table["rank_agreement"][0][0] == pytest.approx(1.0)
    with h5py.File(suite_file, "r") as f:
        v = _committed(f, "rollout/deletion", "value")
    assert table["values"]["rollout"]["deletion"]["mean"] == pytest.approx(np.nanmean(v), rel=1e-12)
    for m, winners in table["best"].items():
        better = max if table["higher_is_better"][m] else min
        means = [table["values"][meth][m]["mean"] for meth in table["methods"] if table["values"][meth][m]["mean"] is not None]
        assert all(table["values"][w][m]["mean"] == better(means) for w in winners)


def test_plot_writes_one_png_per_curve_metric_and_the_heatmap(suite_file, tmp_path):
    out = tmp_path / "plots"
    text = invoke("report", suite_file, "--plot", out)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"{m}.png" for m in CURVES.split(",")] + ["rank_agreement.png"])
    for p in out.iterdir():
        assert p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Plots written" in text
    # a .png path: its stem prefixes the files
    invoke("report", suite_file, "--plot", tmp_path / "x.png")
    assert (tmp_path / "x_insertion.png").stat().st_size > 1000 and (tmp_path / "x_rank_agreement.png").exists()


def test_plotted_curves_are_the_mean_of_the_stored_per_image_curves(suite_file, tmp_path):
    from transexplain.results.plots import plot_suite

    drawn = plot_suite(suite_file, tmp_path / "p")["lines"]
    with h5py.File(suite_file, "r") as f:
        steps = json.loads(f.attrs["config"])["protocol"]["curve_steps"]
        for metric in CURVES.split(","):
            for method, label in (("rollout", "rollout"), ("random", "random")):
                group = f"{method}/{metric}"
                ok = np.isfinite(_committed(f, group, "value"))
                columns = {"curve": ""} if metric not in ("srg", "abpc") else {"curve_morf": " (MoRF)", "curve_lerf": " (LeRF)"}
                for column, suffix in columns.items():
                    curves = _committed(f, group, column)
                    assert curves.shape[0] == 3
                    expected = curves[ok].sum(axis=0) / ok.sum()
                    x, y = drawn[metric][label + suffix]
                    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-15)
                    if metric == "road_morf":
                        np.testing.assert_allclose(x, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
                    else:
                        assert len(x) == steps + 1 and x[0] == 0 and x[-1] == 1
                        np.testing.assert_allclose(np.diff(x), 1 / steps)


def test_a_file_without_the_new_curve_columns_resumes_as_it_was_and_reports(tmp_path):
    """A file written before srg stored its curves: resumed with its own columns (no column half
    filled), reported, and plotted without srg's curves."""
    from transexplain.data.imagenet import Preprocess
    from transexplain.data.shapes import embedded_paths
    from transexplain.evaluation.segmentation import SegmentationData
    from transexplain.evaluation.suite import run_suite
    from transexplain.models.loading import load_model
    from transexplain.results import ResultStore
    from transexplain.results.plots import plot_suite

    loaded = load_model("embedded")
    data = SegmentationData(embedded_paths()["seg"], Preprocess(tuple(loaded.input_size[1:]), loaded.mean, loaded.std))
    out = tmp_path / "old.h5"
    config = {"benchmark": "suite", "methods": ["rollout"], "metrics": ["deletion", "srg"], "model": "embedded"}
    with ResultStore(out, config) as store:
        run_suite(loaded, data, store, ["rollout"], ["deletion", "srg"], limit=2, batch_size=2, quiet=True)
    with h5py.File(out, "a") as f:  # what the older version wrote
        del f["rollout/srg/curve_morf"], f["rollout/srg/curve_lerf"]
    with ResultStore(out, config) as store:
        run_suite(loaded, data, store, ["rollout"], ["deletion", "srg"], limit=4, batch_size=2, quiet=True)
        store.mark_complete()
        assert store.done("rollout/srg") == 4 and store.names("rollout/srg") == ["index", "value"]
        assert store.read("rollout/deletion", "curve").shape == (4, 17)
    text = invoke("report", out)
    assert "| method | deletion ↓ | srg ↑ |" in text
    result = plot_suite(out, tmp_path / "plots")
    assert sorted(p.name for p in result["files"]) == ["deletion.png", "rank_agreement.png"]
