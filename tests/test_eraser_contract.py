"""The text benchmark under the same contract as the image ones (docs/cli.md): the output location
rule, the header line, the report's table, n/a for missing numbers, LaTeX with booktabs and JSON."""
import json
import subprocess

from test_cli_contract import ENTRY, ENV
from test_vision_cli import tx


def test_eraser_writes_results_eraser_method_h5_and_prints_the_header_line(tmp_path):
    r = subprocess.run([str(ENTRY), "eraser", "--method", "rollout", "--limit", "2", "--no-faithfulness", "--quiet"],
                       capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "results" / "eraser_rollout.h5"
    assert out.exists() and not (tmp_path / "eraser_results.h5").exists()
    header = [line for line in r.stdout.splitlines() if line.startswith("eraser | model ")]
    assert header and header[0].endswith("| 2 documents") and "| weights " in header[0] and "| data " in header[0]
    assert "| token_f1_macro at k | rollout |" in r.stdout  # the report's table, as perturb and segment print
    js = subprocess.run([str(ENTRY), "report", out, "--format", "json"], capture_output=True, text=True, env=ENV, timeout=120)
    assert js.returncode == 0, js.stderr
    table = json.loads(js.stdout)["tables"][0]
    assert table["benchmark"] == "eraser" and table["methods"] == ["rollout"]
    # faithfulness was not computed: null in JSON, n/a in the tables, never nan
    assert table["rows"][-1]["values"]["rollout"] is not None  # accuracy
    missing = [row for row in table["rows"] if row["values"]["rollout"] is None]
    assert any(row["key"].startswith("comprehensiveness") for row in missing)
    md = subprocess.run([str(ENTRY), "report", out], capture_output=True, text=True, env=ENV, timeout=120).stdout
    assert "nan" not in md and "| comprehensiveness_aopc | n/a |" in md
    tex = subprocess.run([str(ENTRY), "report", out, "--format", "latex"], capture_output=True, text=True, env=ENV, timeout=120).stdout
    assert r"\toprule" in tex and r"\caption{" in tex and "booktabs" in tex


def test_report_of_an_interrupted_eraser_run_shows_the_documents_so_far(tmp_path):
    """Before: `report` refused ("no finished ERASER method yet") until a method had run to the end."""
    import json

    out = tmp_path / "e.h5"
    args = ("eraser", "--limit", "4", "--batch-size", "2", "--method", "rollout", "--no-faithfulness", "--out", out, "--quiet")
    killed = tx(*args, extra_env={"TX_BENCH_KILL_AFTER_BATCH": "1"})
    assert killed.returncode != 0  # SIGKILLed after its first batch of 2 documents
    for fmt, needle in (("markdown", "PARTIAL (partial: rollout 2 of 4 documents"), ("csv", "rollout [partial]"),
                        ("latex", "PARTIAL (partial: rollout 2 of 4 documents")):
        r = tx("report", out, "--format", fmt)
        assert r.returncode == 0, r.stderr
        assert needle in r.stdout, (fmt, r.stdout)
    table = json.loads(tx("report", out, "--format", "json").stdout)["tables"][0]
    assert "2 of 4" in table["partial"] and table["rows"][0]["values"]["rollout"] is not None
    done = tx(*args)  # the same command resumes and finishes
    assert done.returncode == 0 and "Resuming" in done.stdout, done.stdout + done.stderr
    assert "PARTIAL" not in tx("report", out).stdout
