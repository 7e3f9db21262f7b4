"""Sharded runs under `torchrun`: which examples a rank takes, where it writes them, how shards become one file.

A rank is told its `Shard` and nothing else: it takes the examples whose batch falls to it, batch
k (examples k·B .. k·B+B-1 for a batch size B) going to rank `k % world` (no padding, no
duplicates), writes them to its own resumable shard store
beside the output (`<stem>.shard-<rank>-of-<world>.h5`), and when every rank is done, rank 0
merges the shards' per-example raw records into the output in index order and recomputes every
summary from them (`merge_shards`, also `tx-bench merge`). A one-process run (no torchrun)
writes the output directly, as always. The torch.distributed process group (gloo on the CPU,
nccl on CUDA) is used only to agree at the start (one error for all ranks, the resume point) and
to wait for every rank at the end; no tensor crosses it, so the records cannot depend on it.

Why whole batches and not `index % world`: a float64 explanation moves by ~1e-16 with the other
images of its batch (the BLAS kernels block a matrix product by its row count), and in the
perturbation test such a difference can reorder two equally relevant pixels. Dealt out by batch,
every batch holds the same images as in a one-process run with the same --batch-size, so each
record is bit for bit the one-process record. The batch size is therefore part of a shard's
settings: a shard resumed with another one is refused.
"""
from __future__ import annotations

import contextlib
import datetime
import glob
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

#: the config key a shard store adds to its run's config
SHARD_KEY = "shard"
#: how long a finished rank waits for the others (a resumed rank may be far ahead of them)
WAIT_FOR_OTHERS = datetime.timedelta(days=7)
#: benchmark name -> "module:function" that recomputes every summary of a store from its rows
SUMMARISERS = {
    "perturbation": "transexplain.evaluation.perturbation:summarise_stored",
    "segmentation": "transexplain.evaluation.segmentation:summarise_stored",
    "eraser": "transexplain.evaluation.eraser:summarise_stored",
    "suite": "transexplain.evaluation.suite:summarise_stored",
}
_SHARD_NAME = re.compile(r"\.shard-(\d+)-of-(\d+)$")


@dataclass(frozen=True)
class Shard:
    """Which part of a run this process computes: rank `rank` of `world` processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    block: int = 1  # examples dealt out together: the run's batch size

    def indices(self, n: int):
        """The indices of `range(n)` that fall to this rank, in increasing order."""
        if self.world == 1:
            return range(n)
        blocks = range(self.rank, -(-n // self.block), self.world)
        return [i for b in blocks for i in range(b * self.block, min(n, (b + 1) * self.block))]

    @property
    def settings(self) -> dict:
        """What a shard store records of its shard (and a resume must match)."""
        return {"rank": self.rank, "world": self.world, "block": self.block}

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """`cuda` means this rank's GPU (LOCAL_RANK) in a sharded run."""
        return f"cuda:{self.local_rank}" if device == "cuda" and self.world > 1 else device


WHOLE = Shard()


def from_environment(block: int = 1) -> Shard:
    """The shard torchrun gives this process (RANK, WORLD_SIZE, LOCAL_RANK) for batches of `block`
    examples; the whole run without torchrun."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = int(os.environ.get("RANK", "0") or 0)
        local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers: launch with torchrun.") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK {rank} does not fit WORLD_SIZE {world}: launch with torchrun.")
    return Shard(rank, world, local, max(1, int(block)))


def is_main_process() -> bool:
    """True unless torchrun made this process a rank other than 0 (only rank 0 prints)."""
    return os.environ.get("RANK", "0") in ("", "0")


# ---------------------------------------------------------------------------------------- files
def shard_path(out, rank: int, world: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.shard-{rank}-of-{world}{out.suffix}")


def shards_beside(out) -> list:
    """(world, rank, path) of every shard file of `out` found beside it, sorted."""
    out = Path(out)
    found = []
    for name in glob.glob(str(out.parent / (glob.escape(out.stem) + ".shard-*-of-*" + glob.escape(out.suffix)))):
        path = Path(name)
        m = _SHARD_NAME.search(path.name[: len(path.name) - len(out.suffix)] if out.suffix else path.name)
        if m and path.name.startswith(out.stem + ".shard-"):
            found.append((int(m.group(2)), int(m.group(1)), path))
    return sorted(found)


def _remove_under_lock(path: Path):
    from ..results.store import acquire_write_lock, release_write_lock

    key = acquire_write_lock(path)  # refused (one sentence) while a run writes it
    try:
        path.unlink(missing_ok=True)
    finally:
        release_write_lock(key)


def _names(paths) -> str:
    paths = [Path(p).name for p in paths]
    return ", ".join(paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")


def _existing_final(out: Path, config: dict):
    """(complete, position) of an existing output, refused (one sentence) when its settings differ."""
    from ..results.store import ResultStore, _defining, canonical_json

    store = ResultStore(out)
    if canonical_json(_defining(store.config)) != canonical_json(_defining(config)):
        differing = ResultStore._differences(_defining(store.config), _defining(config))
        raise UserError(f"{out} holds a run with different settings ({differing}): use --overwrite to start over "
                        "or --out to write elsewhere.")
    return store.is_complete, store.position


def _refuse_other_layouts(out: Path, config: dict, overwrite: bool, world: int) -> bool:
    """Check `out` and its shards before a run of `world` processes; True when `out` is complete already.

    With overwrite: remove the output and every shard of it (each under its write lock) instead.
    A run resumed with another number of processes is refused: its shards hold other indices.
    """
    found = shards_beside(out)
    if overwrite:
        for _, _, path in found:
            _remove_under_lock(path)
        if out.exists() and world > 1:
            _remove_under_lock(out)
        return False
    if out.exists():
        complete, position = _existing_final(out, config)
        if complete:
            return True
        if world > 1 and position > 0:
            raise UserError(f"{out} was started by one process ({position} images done) and is now run by {world}: "
                            "resume it without torchrun, or use --overwrite to start over.")
    other = sorted({w for w, _, _ in found if w != world})
    if other:
        paths = [p for w, _, p in found if w == other[0]]
        now = f"{world} processes" if world > 1 else "one process"
        raise UserError(f"{out} was started with {other[0]} processes (shards {_names(paths)}) and is now run by {now}: "
                        f"resume it with {other[0]} processes in total, or use --overwrite to start over.")
    return False


# ---------------------------------------------------------------------------------------- process group
class ProcessGroup:
    """The torch.distributed group of a sharded run: agree at the start, wait for every rank at the end."""

    def __init__(self, shard: Shard, device: str = "cpu"):
        import torch
        import torch.distributed as dist

        self.shard, self.owned, self.group = shard, False, None
        if not dist.is_initialized():
            cuda = str(device).startswith("cuda")
            if cuda:
                torch.cuda.set_device(shard.local_rank)
            dist.init_process_group("nccl" if cuda else "gloo", timeout=WAIT_FOR_OTHERS)
            self.owned = True
        if dist.get_world_size() != shard.world or dist.get_rank() != shard.rank:
            raise UserError(f"The process group ({dist.get_world_size()} processes) does not match WORLD_SIZE "
                            f"{shard.world}: launch with torchrun.")
        # objects and the final wait go over gloo: an nccl barrier would give up after minutes
        if dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo", timeout=WAIT_FOR_OTHERS)

    def gather(self, value) -> list:
        """`value` of every rank, in rank order, on every rank."""
        import torch.distributed as dist

        values = [None] * self.shard.world
        dist.all_gather_object(values, value, group=self.group)
        return values

    def wait_for_all(self):
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def close(self):
        import torch.distributed as dist

        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
            self.owned = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class AgreedError(UserError):
    """A UserError every rank raises alike; rank 0 prints it, the others (`silent`) only exit with it."""

    silent = False


# ---------------------------------------------------------------------------------------- running
@contextlib.contextmanager
def open_results(out, config: dict, overwrite: bool, run, shard: Shard = WHOLE, device: str = "cpu",
                 environment: dict | None = None, say=print, total: int | None = None, unit: str = "images"):
    """Open (or resume) a run's results, let `run(store)` compute what is left of this rank's part,
    and yield the output's store on the main rank (None on the others), open for writing.

    One process: `out` itself is the store, as it always was. Several: each rank's shard store, then
    (after every rank is done) `out` merged from the shards, which are removed once it is written.
    say: prints a message (the complete-run and resume lines); total: the run's size, for them.
    """
    from ..results.store import ResultStore
    from ..results.tables import resuming_line

    out = Path(out)
    if shard.world == 1:
        _refuse_other_layouts(out, config, overwrite, 1)
        with ResultStore(out, config, overwrite=overwrite, environment=environment) as store:
            if store.is_complete:
                say(f"{out} already holds this complete run; showing it (use --overwrite to run again).")
            else:
                if store.position:
                    say(resuming_line(out, store.position, total, unit))
                run(store)
            yield store
        return
    with ProcessGroup(shard, device) as group:
        verdict = None
        if shard.is_main:
            try:
                verdict = "complete" if _refuse_other_layouts(out, config, overwrite, shard.world) else "run"
            except UserError as err:
                verdict = f"error:{err}"
        verdict = group.gather(verdict)[0]
        if verdict.startswith("error:"):
            raise AgreedError(verdict[len("error:"):]) if shard.is_main else _quiet(verdict[len("error:"):])
        if verdict == "complete":
            if shard.is_main:
                say(f"{out} already holds this complete run; showing it (use --overwrite to run again).")
                with ResultStore(out, config, environment=environment) as store:
                    yield store
            else:
                yield None
            return
        path = shard_path(out, shard.rank, shard.world)
        store, error = None, None
        try:
            _refuse_other_batch_size(path, shard)
            store = ResultStore(path, {**config, SHARD_KEY: shard.settings}, environment=environment)
        except UserError as err:
            error = f"rank {shard.rank}: {err}"
        states = group.gather((error, None if store is None else store.position))
        errors = [e for e, _ in states if e]
        if errors:
            if store is not None:
                store.close()
            raise AgreedError(errors[0]) if shard.is_main else _quiet(errors[0])
        done = sum(p for _, p in states)
        if done and shard.is_main:
            say(resuming_line(out, done, total, unit)[:-1] + f" ({shard.world} shards).")
        with store:
            if not store.is_complete:
                run(store)
                store.mark_complete()
        group.wait_for_all()
        if not shard.is_main:
            yield None
            return
        paths = [shard_path(out, r, shard.world) for r in range(shard.world)]
        away = [p for p in paths if not p.exists()]
        if away:
            raise UserError(f"Every rank is done, but {_names(away)} {'is' if len(away) == 1 else 'are'} not on this "
                            f"machine (no shared file system?): copy the shards beside {out} and run "
                            f"`tx-bench merge {out.stem}.shard-*-of-{shard.world}{out.suffix} --out {out}`.")
        merge_shards(paths, out, overwrite=True)
        for p in paths:
            _remove_under_lock(p)
        with ResultStore(out, config, environment=environment) as final:
            yield final


def _refuse_other_batch_size(path: Path, shard: Shard):
    """A shard resumed with another batch size would deal out other images: refused in one sentence."""
    from ..results.store import ResultStore

    if not path.exists():
        return
    try:
        block = (ResultStore(path).config.get(SHARD_KEY) or {}).get("block")
    except UserError:
        return  # the store's own open says what is wrong with the file
    if block is not None and block != shard.block:
        raise UserError(f"{path} was written with --batch-size {block} and is now run with {shard.block}: a sharded run "
                        f"deals out whole batches, so resume it with --batch-size {block} (or use --overwrite).")


def _quiet(message: str) -> AgreedError:
    err = AgreedError(message)
    err.silent = True
    return err


# ---------------------------------------------------------------------------------------- merging
def _base_config(config: dict) -> dict:
    from ..results.store import _defining

    return _defining({k: v for k, v in config.items() if k != SHARD_KEY})


def merge_shards(paths, out, overwrite: bool = False) -> dict:
    """Merge the complete shard stores `paths` (all ranks of one run) into the results file `out`.

    Every group's rows are put in index order (each row carries its example's `index`) and every
    summary is recomputed from them by the benchmark's summariser, so the file is the one a single
    process would have written. Refused in one sentence, naming the files: a file that is not a
    shard, shards of different settings or process counts, a rank twice or missing, an unfinished
    shard, an existing `out` without overwrite. The shards are read only. Returns the summaries.
    """
    from ..results.store import ResultStore, acquire_write_lock, canonical_json, release_write_lock

    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("Give the shard files to merge (<out>.shard-<rank>-of-<world>.h5).")
    out = Path(out)
    if out.resolve() in {p.resolve() for p in paths}:
        raise UserError(f"--out {out} is one of the shards: write the merged file elsewhere.")
    stores = []
    for p in paths:
        if not p.exists():
            raise UserError(f"No shard at {p}: check the path.")
        store = ResultStore(p)
        info = store.config.get(SHARD_KEY)
        if not isinstance(info, dict) or "rank" not in info or "world" not in info:
            raise UserError(f"{p} is not a shard of a sharded run (it holds a whole run): give only "
                            "<out>.shard-<rank>-of-<world>.h5 files.")
        stores.append((p, store, int(info["rank"]), int(info["world"])))
    first_path, first, _, world = stores[0]
    base = canonical_json(_base_config(first.config))
    for p, store, rank, w in stores[1:]:
        if canonical_json(_base_config(store.config)) != base:
            differing = ResultStore._differences(_base_config(first.config), _base_config(store.config))
            raise UserError(f"{p} and {first_path} come from runs with different settings ({differing}): "
                            "merge only the shards of one run.")
        if w != world:
            raise UserError(f"{p} is a shard of a {w}-process run but {first_path} of a {world}-process run: "
                            "merge only the shards of one run.")
        if store.config[SHARD_KEY].get("block") != first.config[SHARD_KEY].get("block"):
            raise UserError(f"{p} and {first_path} deal out batches of different sizes: merge only the shards of one run.")
    by_rank = {}
    for p, store, rank, _ in stores:
        if rank in by_rank:
            raise UserError(f"{by_rank[rank][0]} and {p} are both shard {rank} of {world}: give each shard once.")
        by_rank[rank] = (p, store)
    missing = [r for r in range(world) if r not in by_rank]
    if missing:
        names = _names(shard_path(first_path.with_name(_unsharded_name(first_path)), r, world) for r in missing)
        raise UserError(f"The shard{'s' if len(missing) > 1 else ''} of rank{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(map(str, missing))} of {world} {'are' if len(missing) > 1 else 'is'} missing "
                        f"({names}): give every shard of the run.")
    for r in range(world):
        p, store = by_rank[r]
        if not store.is_complete:
            raise UserError(f"{p} is not finished ({store.position} examples done): resume its run with the same "
                            "command and number of processes before merging.")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists: use --overwrite to replace it, or give another --out.")
    ordered = [by_rank[r][1] for r in range(world)]
    config = {k: v for k, v in first.config.items() if k != SHARD_KEY}
    environments = []
    for store in ordered:
        for env in store.environments:
            if all(canonical_json(env) != canonical_json(e) for e in environments):
                environments.append(env)
    key = acquire_write_lock(out)
    tmp = out.with_name(out.name + ".merging")
    try:
        tmp.unlink(missing_ok=True)
        with ResultStore(tmp, config, overwrite=True, benchmark=first.benchmark,
                         environment=environments[0] if environments else None) as merged:
            position = sum(store.position for store in ordered)
            groups = sorted({g for store in ordered for g in store.row_groups()})
            for group in groups:
                merged.write_batch({group: _merged_rows(ordered, group)}, position=position)
            if not groups:
                merged.write_batch({}, position=position)
            merged.set_attr("environment", canonical_json(environments))
            merged.set_attr("processes", world)
            summaries = summarise_stored(merged)
            merged.mark_complete()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        release_write_lock(key)
    return summaries


def _unsharded_name(path: Path) -> str:
    m = _SHARD_NAME.search(path.stem)
    return (path.stem[: m.start()] if m else path.stem) + path.suffix


def _merged_rows(stores, group: str) -> dict:
    """Every shard's committed rows of `group`, put in order of their `index` column."""
    parts = [store for store in stores if store.done(group)]
    names = sorted({n for store in parts for n in store.names(group)})
    if "index" not in names:
        raise ValueError(f"group {group} has no index column: its rows cannot be put in order")
    columns = {name: [store.read(group, name) for store in parts] for name in names}
    if any(len(c) != len(parts) for c in columns.values()):
        raise ValueError(f"the shards hold different columns in {group}")
    index = np.concatenate(columns["index"])
    order = np.argsort(index, kind="stable")
    if len(np.unique(index)) != len(index):
        raise UserError(f"Example indices appear twice in {group} across the shards: they do not come from one run.")
    return {name: np.concatenate(parts_)[order] for name, parts_ in columns.items()}


def summarise_stored(store) -> dict:
    """Recompute and write every summary of `store` from its rows, with its benchmark's summariser."""
    import importlib

    target = SUMMARISERS.get(store.benchmark)
    if target is None:
        raise UserError(f"{store.path} holds a {store.benchmark or 'unknown'} benchmark, which cannot be merged.")
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)(store)
