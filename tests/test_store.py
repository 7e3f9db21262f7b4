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


# ------------------------------------------------------------------ one writer at a time
def _wait_for_first_batch(path, proc, timeout=120.0):
    """Poll (without HDF5 file locking) until `proc` has committed its first batch to `path`."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with h5py.File(path, "r", locking=False) as f:
                if json.loads(f.attrs.get("commit", '{"position": 0}'))["position"] > 0:
                    return
        except (OSError, KeyError, ValueError):
            pass
        if proc.poll() is not None:
            pytest.fail(f"the first run ended (rc {proc.returncode}) before it was seen writing")
        time.sleep(0.002)
    pytest.fail("the first run never wrote a batch")


def test_a_second_writer_of_the_same_out_is_refused_and_the_first_run_is_intact(tmp_path):
    import os
    import subprocess

    from test_vision_cli import TX_BENCH, env, make_checkpoint, make_image_folder, tx
    from transexplain.results.store import lock_path

    ckpt, imgs = make_checkpoint(tmp_path / "ckpt"), make_image_folder(tmp_path / "imgs", per_class=15)
    out = tmp_path / "shared.h5"
    args = ["perturb", "--method", "full_lrp,transformer_attribution", "--target", "both", "--data", imgs,
            "--model", ckpt, "--limit", 60, "--batch-size", 1, "--out", out, "--quiet"]
    first = subprocess.Popen([str(TX_BENCH), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=env())
    try:
        _wait_for_first_batch(out, first)
        os.kill(first.pid, signal.SIGSTOP)  # hold the first run mid-way, lock held
        try:
            second = tx(*args)
            assert first.poll() is None
        finally:
            os.kill(first.pid, signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.stderr
    error = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(error) == 1 and "being written by another process" in error[0]
    assert f"pid {first.pid}" in error[0] and "perturb" in error[0] and str(out) in error[0]
    assert first.returncode == 0, stderr
    store = ResultStore(out)
    assert store.is_complete and store.position == 60 and store.done("clean") == 60
    for group in ("full_lrp/pred/positive", "transformer_attribution/true/negative"):
        assert store.done(group) == 60 and store.read(group, "hits").shape == (60, 10)
    assert not lock_path(out).exists()  # let go at the end of the run
    # and now that the first has finished, the same command is free to open the file again
    again = tx(*args)
    assert again.returncode == 0 and "already holds this complete run" in again.stdout


def test_the_write_lock_is_per_process_and_released_on_close(tmp_path):
    import subprocess
    import sys

    from transexplain.results.store import lock_path, write_lock_holder

    path = tmp_path / "r.h5"
    probe = ("import sys; from transexplain.results import ResultStore; from transexplain.errors import UserError\n"
             "try:\n    ResultStore(sys.argv[1], {'benchmark': 'perturbation', 'methods': ['rollout'], 'limit': 8})\n"
             "except UserError as err:\n    print(err); sys.exit(2)\n")
    other = lambda: subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True)  # noqa: E731
    store = ResultStore(path, CONFIG)
    same_process = ResultStore(path, CONFIG)  # a second store in this process shares the lock
    refused = other()
    assert refused.returncode == 2 and "being written by another process" in refused.stdout
    assert write_lock_holder(path) is not None
    same_process.close()
    assert other().returncode == 2  # still held by `store`
    store.close()
    assert not lock_path(path).exists() and write_lock_holder(path) is None
    assert other().returncode == 0


def test_a_reader_works_while_the_writer_has_the_file_open(tmp_path):
    """`report` on a file being written: no HDF5 file lock is taken, so neither side fails."""
    from test_vision_cli import tx

    path = tmp_path / "r.h5"
    store = ResultStore(path, {**CONFIG, "tests": ["positive"], "targets": ["pred"]})
    store.write_batch({"clean": {"hit": np.array([True, False])},
                       "rollout/pred/positive": {"hits": np.ones((2, 10), dtype=bool)}}, position=2)
    with h5py.File(path, "a"):  # the writer in the middle of a batch
        r = tx("report", path)
        assert r.returncode == 0, r.stderr
        assert "| AUC (%)" in r.stdout and "| Positive, predicted | 90.00 |" in r.stdout
    store.write_batch({"clean": {"hit": np.array([True])}}, position=3)  # the writer is not disturbed
    store.close()
    assert ResultStore(path).position == 3


# ------------------------------------------------------------------ a kill inside a change
def _second_batch(path):
    store = ResultStore(path, CONFIG, environment={"host": "test"})
    store.write_batch({"a/pos": {"x": np.array([2.5, 3.5]), "name": np.array(["c", "d"])},
                       "b": {"y": np.full((2, 40), 7.0)}, "clean": {"label": np.array([3, 4])}}, position=4)
    store.close()


def _second_batch_killed_at_write(path, k) -> int:
    """The second batch in a forked process that SIGKILLs itself at the k-th write of the change
    (no k: not killed); its exit status as subprocess gives it."""
    import os

    from transexplain.results.journal import KILL_ENV

    pid = os.fork()
    if pid == 0:  # the child: no torch work, only h5py and numpy
        code = 1
        try:
            if k is not None:
                os.environ[KILL_ENV] = str(k)
            _second_batch(path)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _first_batch(path):
    store = ResultStore(path, CONFIG, environment={"host": "test"})
    store.write_batch({"a/pos": {"x": np.array([0.5, 1.5]), "name": np.array(["a", "b"])},
                       "clean": {"label": np.array([1, 2])}}, position=2)
    store.close()


def test_a_kill_at_every_write_of_a_batch_leaves_the_file_of_the_last_batch_byte_for_byte(tmp_path):
    """SIGKILL after the k-th write HDF5 makes while it adds a batch (a new group, datasets grown, the
    commit), for every k: the journal gives back the exact bytes of the file after the first batch,
    and a resumed writer then ends with the file of an uninterrupted run. Before the journal a kill
    here could leave HDF5 metadata half rewritten (CI: "bad heap index" on the resumed rank)."""
    import shutil

    from transexplain.results.journal import journal_path, recover

    base = tmp_path / "base.h5"
    _first_batch(base)
    before = base.read_bytes()
    whole = tmp_path / "whole.h5"
    shutil.copy(base, whole)
    assert _second_batch_killed_at_write(whole, None) == 0
    assert not journal_path(whole).exists()

    path, k = tmp_path / "r.h5", 0
    while True:
        k += 1
        shutil.copy(base, path)
        rc = _second_batch_killed_at_write(path, k)
        if rc == 0:  # the change has fewer than k writes: every place has been tried
            break
        assert rc == -signal.SIGKILL
        assert journal_path(path).exists()
        assert recover(path) and not journal_path(path).exists()
        assert path.read_bytes() == before, f"kill at write {k}"
        _second_batch(path)  # and a resumed run ends as the uninterrupted one
        _same_groups(path, whole)
    assert k > 5, f"only {k - 1} writes in a batch: the test does not reach HDF5's metadata"


def _same_groups(path_a, path_b):
    a, b = ResultStore(path_a), ResultStore(path_b)
    assert a.position == b.position == 4
    for group, names in {"a/pos": ["x", "name"], "b": ["y"], "clean": ["label"]}.items():
        for name in names:
            assert np.array_equal(a.read(group, name), b.read(group, name)), (group, name)


def test_a_reader_undoes_the_change_of_a_killed_writer_and_a_writer_resumes(tmp_path):
    from transexplain.results.journal import journal_path

    path = tmp_path / "r.h5"
    _first_batch(path)
    assert _second_batch_killed_at_write(path, 3) == -signal.SIGKILL and journal_path(path).exists()
    reader = ResultStore(path)  # no writer alive: the reader puts the file back
    assert not journal_path(path).exists()
    assert reader.position == 2 and reader.read("a/pos", "x").tolist() == [0.5, 1.5] and reader.done("b") == 0


def test_an_error_inside_a_change_undoes_it_and_a_journal_of_another_file_is_ignored(tmp_path):
    from transexplain.results.journal import journal_path

    path = tmp_path / "r.h5"
    _first_batch(path)
    before = path.read_bytes()
    store = ResultStore(path, CONFIG, environment={"host": "test"})
    with pytest.raises(ValueError, match="do not fit"):  # the first group is written, then the second fails
        store.write_batch({"new": {"z": np.arange(5.0)}, "a/pos": {"x": np.zeros((2, 3))}}, position=4)
    assert path.read_bytes() == before and not journal_path(path).exists()
    store.close()
    # a journal left by a file this one replaced (another inode) must not touch it
    other = tmp_path / "other.h5"
    _first_batch(other)
    stale = ResultStore(other, CONFIG, environment={"host": "test"})
    stale.close()
    from transexplain.results.journal import JournaledFile

    change = JournaledFile(other)  # a change of `other`, cut short: its journal names other's inode
    change.write(b"\0" * 64)
    change.close()
    journal_path(other).rename(journal_path(path))
    assert ResultStore(path, CONFIG, environment={"host": "test"}).position == 2
    assert path.read_bytes() == before and not journal_path(path).exists()
