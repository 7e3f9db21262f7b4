"""`--option KEY=VALUE` / `METHOD.KEY=VALUE`: one parser for every command (commands.common.method_options),
refused in one sentence before any work, recorded in the run's settings, and applied to the maps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from transexplain.errors import UserError
from transexplain.commands.common import method_options

from test_vision_cli import fixtures, make_checkpoint, make_gtsegs, make_image_folder, run  # noqa: F401 (fixtures)


def test_a_plain_key_goes_to_every_chosen_method_that_has_it():
    got = method_options(["start_layer=0", "saliency.libragrad=true", "steps=5"],
                         ["rollout", "transformer_attribution", "saliency", "integrated_gradients"])
    assert got == {"rollout": {"start_layer": 0}, "transformer_attribution": {"start_layer": 0},
                   "saliency": {"libragrad": True}, "integrated_gradients": {"steps": 5}}
    assert method_options(None, ["rollout"]) == {}


@pytest.mark.parametrize("pairs,methods,words", [
    (["junk"], ["rollout"], "is not KEY=VALUE"),
    (["=3"], ["rollout"], "is not KEY=VALUE"),
    (["steps=3"], ["rollout", "saliency"], "none of the chosen methods"),
    (["rollout.steps=3"], ["rollout"], "has no option steps"),
    (["saliency.libragrad=true"], ["rollout"], "is not among the chosen methods"),
    (["saliency.libragrad=yes"], ["saliency"], "must be true or false"),
    (["integrated_gradients.steps=2.5"], ["integrated_gradients"], "must be a whole number"),
])
def test_bad_options_are_refused_in_one_sentence(pairs, methods, words):
    with pytest.raises(UserError) as err:
        method_options(pairs, methods)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_segment_applies_the_option_and_records_it(fixtures, tmp_path, run):  # noqa: F811
    """The maps a run stores (--save-maps) with --option start_layer=0 are the maps `explain` gives with
    start_layer=0, and not the default's; the settings record the option, so resuming without it is refused."""
    from transexplain import explain
    from transexplain.data.imagenet import Preprocess
    from transexplain.evaluation.segmentation import SegmentationData
    from transexplain.models.loading import load_model
    from transexplain.results import ResultStore

    out = tmp_path / "seg.h5"
    args = ["segment", "--method", "rollout", "--data", fixtures["seg"], "--model", fixtures["ckpt"], "--limit", 3,
            "--batch-size", 3, "--save-maps", "--quiet", "--num-workers", 0, "--out", out]
    done = run(*args, "--option", "start_layer=0")
    assert done.returncode == 0, done.stderr
    store = ResultStore(out)
    assert store.config["method_options"] == {"rollout": {"start_layer": 0}}
    saved = store.read("rollout", "map").astype(np.float64)
    loaded = load_model(str(fixtures["ckpt"]))
    data = SegmentationData(fixtures["seg"], Preprocess(tuple(loaded.input_size[1:]), loaded.mean, loaded.std))
    x = torch.stack([data.load(i)[0] for i in range(3)]).to(torch.float64)
    for start, same in ((0, True), (None, False)):
        kw = {} if start is None else {"start_layer": start}
        want = explain(loaded.model, x, method="rollout", **kw).heatmap.numpy().astype(np.float16).astype(np.float64)
        assert np.array_equal(saved, want) == same
    again = run(*args)  # the same file without the option: other settings
    assert again.returncode == 2 and "--overwrite" in again.stderr


# ------------------------------------------------------------------ text runs: eraser, evaluate, explain --text
from test_text_cli import needs_model  # noqa: E402

TEXT = "the acting is wonderful but the plot is thin ."


def _tx_captured(*args):
    """`tx-bench args` in this process with its output captured (for module-scoped fixtures, where
    capsys is not available)."""
    import contextlib
    import io
    import os
    import subprocess
    import sys

    from transexplain import cli

    out, err, old, code = io.StringIO(), io.StringIO(), sys.argv, 0
    debug = os.environ.pop("TX_BENCH_DEBUG", None)
    sys.argv = ["tx-bench"] + [str(a) for a in args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old
        if debug is not None:
            os.environ["TX_BENCH_DEBUG"] = debug
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def ig_eraser(tmp_path_factory):
    """One `tx-bench eraser` run of integrated gradients with --option steps=5 on 2 documents."""
    out = tmp_path_factory.mktemp("eraser_options") / "ig.h5"
    done = _tx_captured("eraser", "--method", "integrated_gradients", "--option", "steps=5", "--limit", 2,
                        "--quiet", "--out", out)
    assert done.returncode == 0, done.stderr
    return out


def _rows(store_or_rows, method=None) -> dict:
    if method is None:
        rows = store_or_rows
    else:
        rows = {n: store_or_rows.read(method, n) for n in store_or_rows.names(method)}
    return {k: np.asarray(v) for k, v in rows.items() if k not in ("annotation_id", "index")}


@needs_model
def test_eraser_applies_the_option_and_records_it(ig_eraser):
    """The rows `tx-bench eraser --option steps=5` stores are the eraser runner's with steps=5 (explain(...,
    steps=5)), and not those of the default steps=20; the settings record the option."""
    from transexplain.commands.text import _load_examples
    from transexplain.data.eraser import align_labels
    from transexplain.evaluation.eraser import evaluate_batch
    from transexplain.models.text import TextAdapter, load_text_model
    from transexplain.results import ResultStore

    store = ResultStore(ig_eraser)
    assert store.is_complete and store.config["method_options"] == {"integrated_gradients": {"steps": 5}}
    stored = _rows(store, "integrated_gradients")
    examples, desc = _load_examples(None, "test", 2, False, True)
    model, tok = load_text_model("embedded")
    align_labels(examples, getattr(model.config, "id2label", None), int(model.config.num_labels), desc)
    adapter = TextAdapter(model, tok)
    for options, same in (({"steps": 5}, True), (None, False)):
        rows = _rows(evaluate_batch(adapter, tok, examples, "integrated_gradients", store.config["max_length"],
                                    store.config["rationale_k"], options=options))
        assert set(rows) == set(stored)
        equal = all(np.array_equal(rows[k], stored[k], equal_nan=True) for k in rows)
        assert equal == same, options


@needs_model
def test_eraser_resume_with_other_options_is_refused_and_leaves_the_file(ig_eraser, tmp_path, run):
    copy = tmp_path / "ig.h5"
    copy.write_bytes(ig_eraser.read_bytes())
    before = copy.read_bytes()
    for extra in (["--option", "steps=6"], []):
        done = run("eraser", "--method", "integrated_gradients", *extra, "--limit", 2, "--quiet", "--out", copy)
        assert done.returncode == 2, done.stdout
        err = done.stderr.strip()
        assert "different settings" in err and "method_options" in err and "--overwrite" in err
        assert len(err.splitlines()) == 1
        assert copy.read_bytes() == before


@pytest.mark.parametrize("args,words", [
    (["eraser", "--method", "integrated_gradients", "--option", "nosuch=1"], "none of the chosen methods"),
    (["eraser", "--method", "integrated_gradients", "--option", "steps=abc"], "must be a whole number"),
    (["eraser", "--method", "saliency", "--option", "junk"], "is not KEY=VALUE"),
    (["evaluate", "--model", "embedded-text", "--method", "saliency", "--metric", "insertion",
      "--option", "nosuch=1"], "none of the chosen methods"),
    (["explain", "--text", TEXT, "--method", "integrated_gradients", "--option", "steps=abc"],
     "must be a whole number"),
])
def test_bad_options_on_text_runs_are_refused_before_any_work(args, words, tmp_path, run):
    out = tmp_path / "r.h5"
    done = run(*args, *(["--out", out] if args[0] != "explain" else []))
    assert done.returncode == 2
    err = done.stderr.strip()
    assert err.startswith("Error: ") and words in err and len(err.splitlines()) == 1
    assert "No --data given" not in done.stdout  # refused before the data (and the model) are read
    assert not out.exists()


@needs_model
def test_evaluate_on_text_passes_the_option_to_every_explanation_and_records_it(tmp_path, run, monkeypatch):
    """--option libragrad=true reaches the clean explanations and those of the randomised models."""
    import transexplain.api as api
    from transexplain.results import ResultStore

    calls = []
    real = api.explain

    def recording(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(api, "explain", recording)
    out = tmp_path / "ev.h5"
    done = run("evaluate", "--model", "embedded-text", "--method", "saliency", "--metric", "insertion,randomisation",
               "--limit", 2, "--quiet", "--option", "libragrad=true", "--out", out)
    assert done.returncode == 0, done.stderr
    assert ResultStore(out).config["method_options"] == {"saliency": {"libragrad": True}}
    assert len(calls) > 1 and all(kw.get("libragrad") is True for kw in calls)


@needs_model
def test_explain_text_takes_the_option(run):
    from transexplain.commands.text import word_relevance

    done = run("explain", "--text", TEXT, "--method", "integrated_gradients", "--option", "steps=5")
    assert done.returncode == 0, done.stderr
    line = done.stdout.splitlines()[0]
    for options, same in (({"steps": 5}, True), (None, False)):
        words, scores, *_ = word_relevance(TEXT, "embedded", "integrated_gradients", None, "float64", options)
        assert (line == " ".join(f"{w}[{float(s):.2f}]" for w, s in zip(words, scores))) == same
