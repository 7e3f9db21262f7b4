"""Where a number comes from: the environment recorded in every results file and printed by the
report, the paper's checkpoint pinned and its numbers refused beside any other run, and every
dependency pinned in constraints.txt."""
import re
import tomllib
from importlib import metadata
from pathlib import Path

import torch

from transexplain.results import ResultStore
from transexplain.results.environment import PACKAGES, collect_environment
from transexplain.results.tables import paper_numbers, report_text

ROOT = Path(__file__).resolve().parents[1]
PAPER = paper_numbers()


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement(spec: str):
    """(normalised name, pinned version or None) of a PEP 508 requirement string."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*)", spec)
    name, rest = match.group(1), match.group(3).split(";")[0].strip()
    pinned = re.fullmatch(r"==\s*([^,\s]+)", rest)
    return _normalise(name), pinned.group(1) if pinned else None


def _constraints() -> dict:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        assert match, f"constraints.txt line {line!r} is not name==version"
        name = _normalise(match.group(1))
        assert name not in pins, f"{name} pinned twice"
        pins[name] = match.group(2)
    return pins


# ----------------------------------------------------------------------------------- the pins
def test_constraints_pin_every_dependency_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    pins = _constraints()
    assert "transexplain" not in pins
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    for spec in requirements:
        name, pinned = _requirement(spec)
        assert name in pins, f"{spec!r} from pyproject.toml has no pin in constraints.txt"
        if pinned is not None:
            assert pins[name] == pinned, f"pyproject.toml pins {name}=={pinned}, constraints.txt {pins[name]}"
    assert _requirement(next(r for r in project["dependencies"] if _normalise(r).startswith("typer")))[1]


def test_the_installed_environment_is_the_pinned_one():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _constraints()
    for spec in project["dependencies"]:
        name, _ = _requirement(spec)
        installed = metadata.version(name).split("+")[0]
        assert installed == pins[name], f"{name} {installed} is installed but constraints.txt pins {pins[name]}: run make install"


def test_make_install_goes_through_the_constraints_file():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ninstall:")[1].split("\n\n")[0]
    installs = [line for line in recipe.splitlines() if " install " in line and "--upgrade pip" not in line]
    assert installs and all("-c $(CONSTRAINTS)" in line for line in installs)
    assert re.search(r"^CONSTRAINTS := constraints.txt$", makefile, re.M)
    assert "constraints:" in makefile and "freeze --exclude-editable" in makefile
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("make install") < ci.index("make test")


# --------------------------------------------------------------------------- the environment
def test_environment_names_versions_processor_and_precision():
    env = collect_environment("float32", "cpu")
    for name in PACKAGES:
        assert env[name] == metadata.version(name)
    assert env["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert env["python"].count(".") == 2 and env["precision"] == "float32"
    assert env["processor"] == f"CPU {torch.backends.cpu.get_cpu_capability()}"
    if torch.cuda.is_available():
        assert collect_environment("float64", "cuda")["processor"] == f"GPU {torch.cuda.get_device_name(0)}"


def _perturbation_store(path, environment=None, **config):
    base = {"benchmark": "perturbation", "methods": ["rollout", "transformer_attribution"], "tests": ["negative"],
            "targets": ["pred"], "input_size": [3, 224, 224], "crop": False, "limit": None, "data_source": "user",
            "model": "vit_base_patch16_224.orig_in21k_ft_in1k", "model_source": "timm:vit_base_patch16_224.orig_in21k_ft_in1k",
            "weights": "pretrained:orig_in21k_ft_in1k", "architecture": "vit_base_patch16_224",
            "pretrained_tag": "orig_in21k_ft_in1k", "precision": "float64", "batch_size": 32}
    store = ResultStore(path, {**base, **config}, environment=environment)
    store.set_summary("clean", {"n": 50000, "skipped": 0, "accuracy": 0.81})
    store.set_summary("rollout/pred/negative", {"auc": 50.0, "curve": [0.5] * 10})
    store.set_summary("transformer_attribution/pred/negative", {"auc": 51.25, "curve": [0.5] * 10})
    store.mark_complete()
    return store


def test_every_format_prints_the_environment_under_the_table(tmp_path):
    path = tmp_path / "r.h5"
    _perturbation_store(path)
    env = collect_environment("float64")
    assert ResultStore(path).environments == [env]
    for fmt, prefix in (("markdown", ""), ("csv", "# "), ("latex", "% ")):
        text = report_text(path, fmt)
        lines = text.splitlines()
        env_line = [line for line in lines if line.startswith(prefix + "Environment: ")]
        assert len(env_line) == 1, fmt
        assert lines.index(env_line[0]) > max(i for i, line in enumerate(lines) if "Negative, predicted" in line)
        for name in ("python",) + PACKAGES:
            assert f"{name} {env[name]}" in env_line[0]
        assert env["processor"] in env_line[0] and "precision float64" in env_line[0]
    csv_rows = [line for line in report_text(path, "csv").splitlines() if not line.startswith("# ")]
    assert csv_rows[0].startswith("AUC (%),rollout") and len(csv_rows) == 2


def test_a_resume_in_another_environment_adds_a_record(tmp_path):
    path = tmp_path / "r.h5"
    config = {"benchmark": "demo", "precision": "float64"}
    first = {**collect_environment("float64"), "torch": "0.0-first"}
    store = ResultStore(path, config, environment=first)
    store.write_batch({"g": {"x": [1, 2]}}, position=2)
    second = collect_environment("float64")
    # opening without writing (a finished run shown again) records nothing
    ResultStore(path, config, environment=second)
    assert ResultStore(path).environments == [first]
    resumed = ResultStore(path, config, environment=second)
    resumed.write_batch({"g": {"x": [3]}}, position=3)
    resumed.write_batch({"g": {"x": [4]}}, position=4)
    assert ResultStore(path).environments == [first, second]
    from transexplain.results.environment import environment_lines

    lines = environment_lines(ResultStore(path).environments)
    assert "2 environments" in lines[0] and "torch 0.0-first" in lines[1] and f"torch {second['torch']}" in lines[2]


def test_the_eraser_report_prints_the_environment_too(tmp_path, capsys, monkeypatch):
    import sys
    import types

    import transexplain.evaluation as evaluation
    from test_vision_cli import tx_inprocess

    path = tmp_path / "e.h5"
    ResultStore(path, {"benchmark": "eraser", "precision": "float32"}).mark_complete()
    fake = types.ModuleType("transexplain.evaluation.eraser")
    fake.report_text = lambda p, fmt: f"ERASER TABLE {fmt}\n"
    monkeypatch.setitem(sys.modules, "transexplain.evaluation.eraser", fake)
    monkeypatch.setattr(evaluation, "eraser", fake, raising=False)
    for fmt, prefix in (("markdown", ""), ("csv", "# "), ("latex", "% ")):
        r = tx_inprocess("report", path, "--format", fmt, capsys=capsys)
        assert r.returncode == 0, r.stderr
        out = r.stdout.splitlines()
        assert out[0] == f"ERASER TABLE {fmt}"
        assert any(line.startswith(prefix + "Environment: precision float32;") for line in out)


# --------------------------------------------------------------------------- the paper's numbers
def test_the_paper_checkpoint_is_pinned_to_what_timm_calls_the_jax_weights():
    import timm

    model = PAPER["model"]
    assert model["name"] == "vit_base_patch16_224.orig_in21k_ft_in1k"
    assert model["name"] in timm.list_pretrained("vit_base_patch16_224*")
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model["name"])
    assert cfg.tag == model["pretrained_tag"] and model["name"].split(".")[0] == model["architecture"]
    assert "jx_vit_base_p16_224" in (cfg.url or "")  # the reference code's checkpoint
    # the bare name is another checkpoint: exactly why the tag is pinned
    assert get_pretrained_cfg("vit_base_patch16_224").tag != model["pretrained_tag"]
    assert PAPER["protocol"]["perturbation"]["images"] == 50000 and PAPER["protocol"]["segmentation"]["images"] == 4276


def _row(text):
    return [line for line in text.splitlines() if line.startswith("| Negative, predicted")][0]


def _note(text):
    notes = [line for line in text.splitlines() if line.startswith("Paper numbers not shown: ")]
    assert len(notes) <= 1
    return notes[0] if notes else None


def test_paper_numbers_beside_a_paper_run_only(tmp_path):
    paper = PAPER["perturbation"]["negative"]["pred"]
    _perturbation_store(tmp_path / "ok.h5")
    text = report_text(tmp_path / "ok.h5")
    assert _row(text) == f"| Negative, predicted | 50.00 ({paper['rollout']:.2f}) | 51.25 ({paper['transformer_attribution']:.2f}) |"
    assert _note(text) is None
    cases = {
        "augreg": ({"model": "vit_base_patch16_224", "model_source": "timm:vit_base_patch16_224",
                    "weights": "pretrained:augreg2_in21k_ft_in1k", "pretrained_tag": "augreg2_in21k_ft_in1k"},
                   "pretrained tag augreg2_in21k_ft_in1k is not the paper's orig_in21k_ft_in1k"),
        "deit": ({"model": "deit_base_patch16_224", "architecture": "deit_base_patch16_224",
                  "model_source": "timm:deit_base_patch16_224", "pretrained_tag": "fb_in1k"},
                 "model deit_base_patch16_224 is not the paper's vit_base_patch16_224.orig_in21k_ft_in1k"),
        "random": ({"weights": "random-init", "pretrained_tag": None},
                   "weights random-init are not timm's pretrained vit_base_patch16_224.orig_in21k_ft_in1k"),
        "checkpoint": ({"model": "vit_base_patch16_224", "model_source": "/models/vit.safetensors",
                        "weights": "checkpoint:/models/vit.safetensors", "pretrained_tag": None},
                       "weights checkpoint:/models/vit.safetensors are not timm's pretrained"),
        "embedded": ({"data_source": "embedded"}, "data is the embedded shapes set, not the paper's"),
        "limit": ({"limit": 1000}, "only the first 1000 images (--limit)"),
        "crop": ({"crop": True}, "center crop, not the paper's plain resize"),
    }
    for name, (change, reason) in cases.items():
        path = tmp_path / f"{name}.h5"
        _perturbation_store(path, **change)
        text = report_text(path)
        assert _row(text) == "| Negative, predicted | 50.00 | 51.25 |", name
        assert reason in _note(text), name
        assert text.index(_note(text)) > text.index(_row(text))
        for fmt, prefix in (("csv", "# "), ("latex", "% ")):
            other = report_text(path, fmt)
            assert f"{prefix}Paper numbers not shown: " in other and reason in other and f"({paper['rollout']:.2f})" not in other


def test_paper_numbers_need_the_full_data_set(tmp_path):
    path = tmp_path / "part.h5"
    store = _perturbation_store(path)
    store.set_summary("clean", {"n": 996, "skipped": 4, "accuracy": 0.8})
    text = report_text(path)
    assert _row(text) == "| Negative, predicted | 50.00 | 51.25 |"
    assert "1000 images, not the paper's full 50000" in _note(text)
    seg = tmp_path / "seg.h5"
    config = {k: v for k, v in ResultStore(path).config.items() if k not in ("tests", "targets")}
    s = ResultStore(seg, {**config, "benchmark": "segmentation"})
    s.set_summary("images", {"n": 4276, "skipped": 0})
    s.set_summary("rollout", {"pixel_accuracy": 70.0, "map": 80.0, "miou": 50.0, "n": 4276})
    s.mark_complete()
    full = report_text(seg)
    assert f"70.00 ({PAPER['segmentation']['pixel_accuracy']['rollout']:.2f})" in full and _note(full) is None
    s.set_summary("images", {"n": 100, "skipped": 0})
    assert "100 images, not the paper's full 4276" in _note(report_text(seg))


def test_bare_timm_name_records_no_paper_tag_for_random_weights():
    from transexplain.commands.vision import checkpoint_identity
    from transexplain.models.loading import load_model

    loaded = load_model("vit_tiny_patch16_224", random_weights=True)
    assert checkpoint_identity(loaded) == ("vit_tiny_patch16_224", None)
