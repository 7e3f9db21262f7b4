"""Sharded runs under torchrun (gloo on the CPU): the same records and numbers as one process, a killed
rank resumed, the shards merged by hand, and every refusal in one sentence with the shards untouched."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_vision_cli import env, make_checkpoint, make_gtsegs, make_image_folder, run, tx  # noqa: F401 (run: fixture)

ROOT = Path(__file__).resolve().parents[1]
#: the embedded benchmark of these tests: 12 images, batches of 2 (so each of 3 ranks gets 2 batches)
PERTURB = ["perturb", "--method", "rollout,transformer_attribution", "--target", "both", "--limit", 12,
           "--batch-size", 2, "--quiet"]


def torchrun(nproc: int, *args, extra_env=None, timeout=300):
    """`torchrun --standalone --nproc_per_node N -m transexplain args` in a subprocess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "transexplain"] + [str(a) for a in args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env(**(extra_env or {})), timeout=timeout)


def records(path) -> dict:
    """Every dataset of every row group and every summary of a results file."""
    from transexplain.results import ResultStore

    store = ResultStore(path)
    out = {"position": store.position, "config": store.config, "complete": store.is_complete}
    for group in store.row_groups():
        for name in store.names(group):
            out[f"{group}/{name}"] = store.read(group, name)
    for group in set(store.groups()) | set(store.row_groups()):
        out[f"{group}#summary"] = store.summary(group)
    return out


def assert_same_records(a, b):
    import json

    ra, rb = records(a), records(b)
    assert sorted(ra) == sorted(rb)
    for key in ra:
        if isinstance(ra[key], np.ndarray):
            nan = ra[key].dtype.kind == "f"
            assert ra[key].dtype == rb[key].dtype and np.array_equal(ra[key], rb[key], equal_nan=nan), key
        else:
            assert json.dumps(ra[key], sort_keys=True) == json.dumps(rb[key], sort_keys=True), key  # NaN alike


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    data = {"ckpt": make_checkpoint(root / "ckpt"), "imgs": make_image_folder(root / "imgs"),
            "seg": make_gtsegs(root / "seg.mat", n=8), "root": root}
    one = root / "one.h5"
    r = tx(*PERTURB, "--data", data["imgs"], "--model", data["ckpt"], "--out", one, "--num-workers", 0)
    assert r.returncode == 0, r.stderr
    data["one"] = one
    return data


# ---------------------------------------------------------------------------------------- end to end
def test_three_processes_give_every_record_and_number_of_one_process(fixtures, tmp_path):
    out = tmp_path / "three.h5"
    r = torchrun(3, *PERTURB, "--data", fixtures["imgs"], "--model", fixtures["ckpt"], "--out", out,
                 "--num-workers", 1)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("| Negative, predicted |") == 1  # only rank 0 prints
    assert_same_records(fixtures["one"], out)
    assert not list(tmp_path.glob("three.shard-*"))  # merged, then removed
    from transexplain.results import ResultStore

    assert ResultStore(out).attr("processes") == 3


def test_a_rank_killed_mid_run_resumes_to_the_same_numbers(fixtures, tmp_path):
    out = tmp_path / "killed.h5"
    args = [*PERTURB, "--data", fixtures["imgs"], "--model", fixtures["ckpt"], "--out", out, "--num-workers", 0]
    killed = torchrun(3, *args, extra_env={"TX_BENCH_KILL_AFTER_BATCH": "1", "TX_BENCH_KILL_RANK": "1"})
    assert killed.returncode != 0 and not out.exists()
    shard = tmp_path / "killed.shard-1-of-3.h5"
    assert shard.exists()
    from transexplain.results import ResultStore

    assert ResultStore(shard).position == 2 and not ResultStore(shard).is_complete  # one batch of two images
    resumed = torchrun(3, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stdout and "(3 shards)" in resumed.stdout
    assert_same_records(fixtures["one"], out)


def test_every_rank_killed_inside_an_hdf5_write_resumes_to_the_same_numbers(fixtures, tmp_path):
    """A rank SIGKILLs itself in the middle of HDF5 writing its second batch into its shard (as
    torchrun's SIGTERM to the other ranks did in CI, leaving "bad heap index"): the undo journal puts
    the shard back to its last complete batch and the resumed run ends with one process's numbers."""
    from transexplain.results.journal import KILL_ENV, journal_path

    out = tmp_path / "torn.h5"
    args = [*PERTURB, "--data", fixtures["imgs"], "--model", fixtures["ckpt"], "--out", out, "--num-workers", 0]
    # each rank's changes: 1 the new shard's session record, 2 its first batch, 3 its second batch
    torn = torchrun(3, *args, extra_env={KILL_ENV: "3:5"})
    assert torn.returncode != 0 and not out.exists()
    shards = sorted(tmp_path.glob("torn.shard-*.h5"))
    # the first rank to reach that write dies in it; torchrun then SIGTERMs the others wherever they are
    assert len(shards) == 3 and any(journal_path(s).exists() for s in shards)
    from transexplain.results import ResultStore

    assert {ResultStore(s).position for s in shards} <= {0, 2}  # a reader puts each back to a whole batch
    assert not any(journal_path(s).exists() for s in shards)
    resumed = torchrun(3, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_records(fixtures["one"], out)
    assert not list(tmp_path.glob("torn.*journal"))


def test_segmentation_with_two_processes_equals_one(fixtures, tmp_path):
    base = ["segment", "--method", "rollout", "--data", fixtures["seg"], "--model", fixtures["ckpt"],
            "--batch-size", 3, "--quiet", "--num-workers", 0]
    assert tx(*base, "--out", tmp_path / "one.h5").returncode == 0
    r = torchrun(2, *base, "--out", tmp_path / "two.h5")
    assert r.returncode == 0, r.stderr
    assert_same_records(tmp_path / "one.h5", tmp_path / "two.h5")


def test_metric_suite_with_three_processes_equals_one(fixtures, tmp_path):
    """`evaluate` under torchrun: random metrics included (their noise is drawn per image), every
    per-image record and summary equal to one process's."""
    base = ["evaluate", "--method", "rollout,saliency", "--metric", "deletion,road_morf,infidelity,pointing_game",
            "--data", fixtures["seg"], "--model", fixtures["ckpt"], "--batch-size", 2, "--quiet", "--num-workers", 0]
    assert tx(*base, "--out", tmp_path / "one.h5").returncode == 0
    r = torchrun(3, *base, "--out", tmp_path / "three.h5")
    assert r.returncode == 0, r.stderr
    assert_same_records(tmp_path / "one.h5", tmp_path / "three.h5")


@pytest.mark.skipif(not (ROOT / "transexplain" / "assets" / "embedded_text" / "head.safetensors").exists(),
                    reason="the embedded text model is not built")
def test_eraser_with_two_processes_equals_one(tmp_path):
    base = ["eraser", "--method", "rollout", "--limit", 5, "--batch-size", 2, "--no-faithfulness", "--quiet"]
    assert tx(*base, "--out", tmp_path / "one.h5").returncode == 0
    r = torchrun(2, *base, "--out", tmp_path / "two.h5")
    assert r.returncode == 0, r.stderr
    assert_same_records(tmp_path / "one.h5", tmp_path / "two.h5")


# ---------------------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def killed(fixtures):
    """(out, its shards) of a 3-process run whose rank 1 was killed after its first batch (left as is)."""
    out = fixtures["root"] / "k.h5"
    r = torchrun(3, *PERTURB, "--data", fixtures["imgs"], "--model", fixtures["ckpt"], "--out", out,
                 "--num-workers", 0, extra_env={"TX_BENCH_KILL_AFTER_BATCH": "1", "TX_BENCH_KILL_RANK": "1"})
    assert r.returncode != 0
    shards = sorted(out.parent.glob(out.stem + ".shard-*.h5"))
    # the ranks torchrun stopped may have been inside a write (they reach it with rank 1): reading each
    # shard once undoes such a cut-short change (journal.py), so the tests compare settled bytes
    from transexplain.results import ResultStore
    from transexplain.results.journal import journal_path

    for shard in shards:
        ResultStore(shard)
        assert not journal_path(shard).exists()
    return out, shards


def _snapshot(paths):
    return {p: p.read_bytes() for p in paths}


def test_another_world_size_or_batch_size_is_refused_and_the_shards_are_untouched(fixtures, killed, run):
    out, shards = killed
    before = _snapshot(shards)
    args = [*PERTURB, "--data", fixtures["imgs"], "--model", fixtures["ckpt"], "--out", out, "--num-workers", 0]
    one = run(*args)
    assert one.returncode == 2
    assert "was started with 3 processes" in one.stderr and "now run by one process" in one.stderr
    two = torchrun(2, *args)
    assert two.returncode != 0 and "was started with 3 processes" in two.stderr and "now run by 2 processes" in two.stderr
    assert two.stderr.count("was started with 3 processes") == 1  # rank 0 says it, the other rank only exits
    other_batch = torchrun(3, *[a if a != 2 else 3 for a in args])
    assert other_batch.returncode != 0 and "was written with --batch-size 2 and is now run with 3" in other_batch.stderr
    assert _snapshot(shards) == before and not out.exists()


def test_merge_by_hand_refuses_missing_unfinished_foreign_and_mixed_shards(fixtures, killed, tmp_path, run):
    import json
    import shutil

    import h5py

    from transexplain.results.store import canonical_json

    _, shards = killed
    before = _snapshot(shards)
    merged = tmp_path / "merged.h5"
    missing = run("merge", shards[0], shards[2], "--out", merged)
    assert missing.returncode == 2 and "shard of rank 1 of 3 is missing (k.shard-1-of-3.h5)" in missing.stderr
    unfinished = run("merge", *shards, "--out", merged)
    # rank 1 killed itself after a batch; the others may have been stopped by torchrun before they finished
    assert unfinished.returncode == 2 and ".h5 is not finished (" in unfinished.stderr
    assert "examples done): resume its run" in unfinished.stderr
    whole = run("merge", shards[0], fixtures["one"], "--out", merged)
    assert whole.returncode == 2 and "is not a shard of a sharded run" in whole.stderr
    twice = run("merge", shards[0], shards[0], "--out", merged)
    assert twice.returncode == 2 and "are both shard 0 of 3" in twice.stderr
    other = tmp_path / "other.shard-2-of-3.h5"  # the shard of a run with another method list
    shutil.copy(shards[2], other)
    with h5py.File(other, "a") as f:
        config = json.loads(f.attrs["config"])
        config["methods"] = ["rollout"]
        f.attrs["config"] = canonical_json(config)
    mixed = run("merge", shards[0], shards[1], other, "--out", merged)
    assert mixed.returncode == 2 and "other.shard-2-of-3.h5 and" in mixed.stderr and "different settings" in mixed.stderr
    assert not merged.exists() and _snapshot(shards) == before


def test_merge_by_hand_of_complete_shards_equals_one_process(fixtures, tmp_path, run):
    """Shards gathered from several machines: `tx-bench merge` writes the one-process file. The
    shards are cut by hand from the one-process file, as three ranks would have written them."""
    cut_shards(fixtures["one"], tmp_path / "run.h5", world=3, block=2)
    shards = sorted(tmp_path.glob("run.shard-*.h5"))
    merged = tmp_path / "merged.h5"
    done = run("merge", *shards, "--out", merged)
    assert done.returncode == 0, done.stderr
    assert "Merged 3 shards" in done.stdout and "| Negative, predicted |" in done.stdout
    assert_same_records(fixtures["one"], merged)
    again = run("merge", *shards, "--out", merged)
    assert again.returncode == 2 and "use --overwrite" in again.stderr


def cut_shards(path, out, world: int, block: int):
    """Cut a one-process results file into the shards `world` ranks would have written beside `out`."""
    from transexplain.evaluation import sharding
    from transexplain.results.store import ResultStore

    one = ResultStore(path)
    total = max(len(one.read(g, "index")) for g in one.row_groups())
    for rank in range(world):
        shard = sharding.Shard(rank, world, block=block)
        mine = list(shard.indices(total))
        rows = {}
        for group in one.row_groups():
            keep = np.isin(one.read(group, "index"), mine)
            rows[group] = {name: one.read(group, name)[keep] for name in one.names(group)}
        config = {**one.config, sharding.SHARD_KEY: shard.settings}
        with ResultStore(sharding.shard_path(out, rank, world), config, benchmark=one.benchmark) as s:
            s.write_batch(rows, position=len(mine))
            s.mark_complete()


def test_merge_by_hand_of_metric_suite_shards_prints_the_suite_report(fixtures, tmp_path, run):
    """`tx-bench merge` of `evaluate` shards: the one-process file again, and the suite's report
    (method x metric table, rank agreement) printed, as `tx-bench report` prints it."""
    one = tmp_path / "one.h5"
    done = run("evaluate", "--method", "rollout,random", "--metric", "deletion,pointing_game", "--data", fixtures["seg"],
               "--model", fixtures["ckpt"], "--batch-size", 2, "--limit", 6, "--quiet", "--num-workers", 0, "--out", one)
    assert done.returncode == 0, done.stderr
    cut_shards(one, tmp_path / "run.h5", world=2, block=2)
    merged = tmp_path / "merged.h5"
    done = run("merge", *sorted(tmp_path.glob("run.shard-*.h5")), "--out", merged)
    assert done.returncode == 0, done.stderr
    assert "Kendall" in done.stdout and "pointing_game" in done.stdout and "Merged 2 shards" in done.stdout
    assert_same_records(one, merged)


# ---------------------------------------------------------------------------------------- units
@pytest.mark.parametrize("n,world,block", [(12, 3, 2), (13, 3, 2), (5, 4, 3), (1, 3, 1), (100, 7, 8)])
def test_shards_deal_out_whole_batches_without_padding_or_duplicates(n, world, block):
    from transexplain.evaluation.sharding import Shard

    parts = [list(Shard(r, world, block=block).indices(n)) for r in range(world)]
    assert sorted(i for p in parts for i in p) == list(range(n))
    for r, part in enumerate(parts):
        assert all((i // block) % world == r for i in part) and part == sorted(part)


def test_batches_come_in_order_whatever_the_number_of_workers(fixtures):
    from transexplain.data.imagenet import ImageFolderDataset, Preprocess
    from transexplain.data.loader import BatchLoader

    ds = ImageFolderDataset(fixtures["imgs"], Preprocess((32, 32), (0.5,) * 3, (0.5,) * 3))
    indices = [0, 3, 4, 7, 8, 11, 12, 15, 19]
    seen = {}
    for workers in (0, 2):
        batches = list(BatchLoader(ds, indices, 2, num_workers=workers, position=5))
        seen[workers] = batches
        assert [b.indices for b in batches] == [[0, 3], [4, 7], [8, 11], [12, 15], [19]]
        assert [b.position for b in batches] == [7, 9, 11, 13, 14]
    for a, b in zip(seen[0], seen[2]):
        assert np.array_equal(a.items.numpy(), b.items.numpy())


def test_num_workers_does_not_change_the_records(fixtures, tmp_path):
    out = tmp_path / "workers.h5"
    r = tx(*PERTURB, "--data", fixtures["imgs"], "--model", fixtures["ckpt"], "--out", out, "--num-workers", 2)
    assert r.returncode == 0, r.stderr
    assert_same_records(fixtures["one"], out)
