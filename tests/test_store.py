"""The resumable HDF5 results store: API, commits, roll-back, config checks, and resume after SIGKILL."""
import json
import signal

import h5py
import numpy as np
import pytest

from transexplain.errors import UserError
from transexplain.results import ResultStore

CONFIG = {"benchmark": "perturbation", "methods": ["rollout"], "limit": 8}


def test_append_read_summary_and_completion(tmp_path):
    store = ResultStore(tmp_path / "r.h5", CONFIG)
    assert store.done("m/positive") == 0 and not store.is_complete
    store.append("m/positive", {"hits": np.ones((3, 10), bool), "name": np.array(["a", "b", "c"])})
    store.append("m/positive", {"hits": np.zeros((2, 10), bool), "name": np.array(["d", "e"])})
    assert store.done("m/positive") == 5
    assert store.read("m/positive", "hits").sum() == 30
    assert store.read("m/positive", "name").tolist() == ["a", "b", "c", "d", "e"]
    store.set_summary("m/positive", {"auc": 12.5, "curve": [1.0, 0.5]})
    assert store.summary("m/positive") == {"auc": 12.5, "curve": [1.0, 0.5]}
    store.mark_complete()
    reopened = ResultStore(tmp_path / "r.h5")  # read-only
    assert reopened.is_complete and reopened.benchmark == "perturbation" and reopened.config == CONFIG
    assert reopened.groups() == ["m"] and reopened.subgroups("m") == ["positive"]


def test_rows_of_different_lengths_are_refused(tmp_path):
    store = ResultStore(tmp_path / "r.h5", CONFIG)
    with pytest.raises(ValueError):
        store.append("g", {"a": np.zeros(3), "b": np.zeros(4)})


def test_same_config_resumes_and_other_config_is_refused(tmp_path):
    path = tmp_path / "r.h5"
    ResultStore(path, CONFIG).append("g", {"a": np.arange(4)})
    assert ResultStore(path, dict(CONFIG)).done("g") == 4  # key order does not matter
    with pytest.raises(UserError, match=r"different settings \(methods: .*--overwrite"):
        ResultStore(path, {**CONFIG, "methods": ["raw_attention"]})
    fresh = ResultStore(path, {**CONFIG, "methods": ["raw_attention"]}, overwrite=True)
    assert fresh.done("g") == 0


def test_damaged_or_foreign_files_give_one_clear_sentence(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"this is not hdf5")
    with pytest.raises(UserError, match="damaged or not an HDF5 file: use --overwrite"):
        ResultStore(junk, CONFIG)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(2)
    with pytest.raises(UserError, match="not a transexplain results file"):
        ResultStore(foreign, CONFIG)
    assert ResultStore(junk, CONFIG, overwrite=True).done("g") == 0


def test_write_batch_commits_and_a_torn_batch_is_rolled_back(tmp_path):
    path = tmp_path / "r.h5"
    store = ResultStore(path, CONFIG)
    store.write_batch({"a": {"x": np.arange(3)}, "b": {"y": np.ones((3, 2))}}, position=3)
    assert store.position == 3
    # simulate a kill after group rows were written but before the commit attribute moved on
    with h5py.File(path, "a") as f:
        f["a/x"].resize(5, axis=0)
        f["a/x"][3:] = [7, 7]
        f["a"].attrs["rows"] = 5
        f.create_group("c").attrs["rows"] = 2
    resumed = ResultStore(path, CONFIG)
    assert resumed.position == 3 and resumed.done("a") == 3 and resumed.done("c") == 0
    resumed.write_batch({"a": {"x": np.array([10, 11])}, "b": {"y": np.zeros((2, 2))}}, position=5)
    assert resumed.read("a", "x").tolist() == [0, 1, 2, 10, 11]
    assert resumed.read("b", "y").shape == (5, 2)


def _same_results(path_a, path_b):
    with h5py.File(path_a, "r") as a, h5py.File(path_b, "r") as b:
        names = []
        a.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for name in names:
            assert np.array_equal(a[name][:], b[name][:]), name
        for group in ("rollout/pred/positive", "transformer_attribution/true/negative", "clean"):
            assert json.loads(a[group].attrs["summary"]) == json.loads(b[group].attrs["summary"])


def test_perturb_killed_with_sigkill_resumes_to_the_uninterrupted_result(tmp_path):
    from test_vision_cli import make_checkpoint, make_image_folder, tx

    ckpt, imgs = make_checkpoint(tmp_path / "ckpt"), make_image_folder(tmp_path / "imgs")
    args = ["perturb", "--method", "rollout,transformer_attribution", "--target", "both", "--data", imgs,
            "--model", ckpt, "--limit", 12, "--batch-size", 4, "--quiet"]
    killed = tmp_path / "killed.h5"
    r = tx(*args, "--out", killed, extra_env={"TX_BENCH_KILL_AFTER_BATCH": "2"})
    assert r.returncode == -signal.SIGKILL
    partial = ResultStore(killed)
    assert not partial.is_complete and partial.position == 8 and partial.done("clean") == 8
    r = tx(*args, "--out", killed)
    assert r.returncode == 0, r.stderr
    whole = tmp_path / "whole.h5"
    assert tx(*args, "--out", whole).returncode == 0
    assert ResultStore(killed).is_complete
    _same_results(killed, whole)


def test_append_after_write_batch_survives_a_reopen(tmp_path):
    path = tmp_path / "r.h5"
    store = ResultStore(path, CONFIG)
    store.write_batch({"a": {"x": np.arange(2)}}, position=2)
    store.append("extra", {"y": np.arange(3)})
    reopened = ResultStore(path, CONFIG)
    assert reopened.done("extra") == 3 and reopened.done("a") == 2 and reopened.position == 2
    assert ResultStore(path).read("extra", "y").tolist() == [0, 1, 2]
