"""Every sub-command's `--help`, through the installed entry point, against docs/cli.md."""
import re
import subprocess

import pytest

from test_cli_contract import ENTRY, ENV

BENCHMARKS = ("perturb", "segment", "eraser")


def _help(*command):
    r = subprocess.run([str(ENTRY), *command, "--help"], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, (command, r.stderr)
    return r.stdout


def _commands(text):
    block = text.split("Commands:", 1)[1] if "Commands:" in text else ""
    return [line.split()[0] for line in block.splitlines() if line.startswith("  ") and line.split()]


def all_commands():
    top = _commands(_help())
    found = []
    for name in top:
        subs = _commands(_help(name))
        found += [(name, sub) for sub in subs] if subs else [(name,)]
    return top, found


def _option_line(text, option):
    lines = [line for line in text.splitlines() if re.search(rf"(^|[ ,]){re.escape(option)}([ ,]|$)", line)]
    return lines[0] if lines else None


def test_every_command_of_the_contract_is_there_and_every_help_is_clean():
    top, commands = all_commands()
    assert {"methods", "explain", "perturb", "segment", "eraser", "report", "data"} <= set(top)
    assert ("data", "make") in commands
    for command in commands:
        text = _help(*command)
        assert "<bool>" not in text and "BOOLEAN" not in text, command  # flags shown as flags
        assert text.startswith(f"Usage: tx-bench {' '.join(command)}"), command
        assert "--help" in text


@pytest.mark.parametrize("command", BENCHMARKS)
def test_every_benchmark_has_the_common_options(command):
    text = _help(command)
    for option in ("--method", "--data", "--limit", "--batch-size", "--precision", "--out", "--overwrite", "--quiet"):
        assert _option_line(text, option), (command, option)
    assert re.search(r"-m, --model", text), command
    assert re.search(r"-o, --out", text), command
    assert f"results/{command}_<method>.h5" in " ".join(text.split()), command  # the output location rule
    assert re.search(r"--quiet\s{2,}\S", text), "--quiet is a flag"


@pytest.mark.parametrize("command", BENCHMARKS)
def test_limit_shows_its_range(command):
    line = _option_line(_help(command), "--limit")
    assert "<int range>" in line and "x>=1" in _help(command).split("--limit", 1)[1].split("\n  -")[0]


@pytest.mark.parametrize("command", BENCHMARKS)
def test_every_benchmark_has_device(command):
    assert _option_line(_help(command), "--device")


def test_report_offers_every_format_and_several_files():
    text = _help("report")
    for fmt in ("markdown", "csv", "latex", "json"):
        assert fmt in text
    assert re.search(r"results\]?\.\.\.", text, re.I)


def test_explain_takes_files_or_folders():
    text = _help("explain")
    assert re.search(r"images\]?\.\.\.", text, re.I) and "folder" in text and re.search(r"-m, --model", text) and re.search(r"-o, --out", text)
