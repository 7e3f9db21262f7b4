"""A resumable HDF5 store for benchmark results: one file per run, rows appended batch by batch.

Layout of a file::

    /                      attrs: benchmark (str), config (JSON str), format_version, complete (bool),
                           environment (JSON list: every distinct software/hardware record the run saw)
    /<group>/              attrs: rows (int, committed row count), summary (JSON str, optional)
    /<group>/<name>        dataset, first axis = one row per example, resizable

How a crash is survived: every change (a batch of rows, a summary, an attribute) is one
transaction. The writer hands HDF5 a file object that first copies, into the undo journal
`<out>.journal`, every byte of the file the change is about to overwrite or cut off
(`journal.JournaledFile`); the change is committed by removing the journal once HDF5 has closed
the file. A process killed inside a change (SIGKILL, torchrun's SIGTERM to the other ranks, the OOM
killer) leaves the journal, and the next open (by a writer, or by a reader when no writer is
alive) writes the old bytes back: the file is, byte for byte, what the last completed change left,
never HDF5 metadata half rewritten. On top of that, rows go in with `write_batch`, which fills
every group's datasets and then rewrites one root attribute, `commit` (JSON: the run's `position`
and every group's row count), so a run resumes after its last complete batch and ends with the
numbers of an uninterrupted run. The root `complete` attribute is set by `mark_complete()` only,
so a crashed run never looks finished. A file HDF5 cannot open is reported as damaged with a hint
to use `--overwrite`. (`append` is the single-group form, committed by the group's own `rows`
attribute.)

The API is generic (no notion of images or texts) so that every benchmark can use it::

    store = ResultStore("results.h5", config, overwrite=False)   # creates, or resumes if config matches
    start = store.position                                        # where the last committed batch ended
    store.write_batch({"rollout/positive": {"hits": hits}, "clean": {"label": labels}}, position=end)
    store.done("rollout/positive"), store.read("rollout/positive", "hits")
    store.set_summary("rollout/positive", {"auc": 21.3})
    store.mark_complete()

What the numbers were computed with (versions of torch, timm, transformers, numpy, h5py and python,
the CPU kernel set or GPU, the precision; `environment.collect_environment`) is recorded when the
file is created and again with the first rows a resumed session writes, when it differs: a resume
in another environment adds a record rather than replacing it, so a report can say that a run was
computed in more than one. Config keys in `RECORDED_ONLY` (the batch size) are recorded but do not
make a resume refused (in the default float64 they do not change a number); a resume that writes
rows with another value keeps every value used, as a list.

One writer at a time: a store opened for writing holds an exclusive `fcntl.flock` on a sidecar
file `<out>.lock` (which names the holder: pid and command line) from the moment it is opened
until `close()` or the end of the process, so a second process that opens the same file for
writing (a second terminal, a resume while the first run still goes) is refused with one sentence
naming the first. Stores of the same file inside one process share the lock. Readers take no lock
at all and open the HDF5 file without HDF5's own file locking (retrying a moment when they catch
a batch half written), so `tx-bench report` works on a file that is being written and never
makes the writer fail.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import weakref
from pathlib import Path

import numpy as np

from ..errors import UserError
from .journal import JournaledFile, journal_path, recover

FORMAT_VERSION = 1
#: config keys that describe a run but do not define it: a resume may change them (all values are kept)
RECORDED_ONLY = ("batch_size",)


#: lock files this process holds: resolved results path -> [file descriptor, number of open stores]
_HELD_LOCKS: dict = {}


def lock_path(path) -> Path:
    """The sidecar file whose `flock` marks `path` as being written: `<path>.lock`."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _holder_text(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1000).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "a process that did not say which"


def _describe_this_process() -> str:
    command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:]) if sys.argv and sys.argv[0] else "python"
    if len(command) > 200:
        command = command[:197] + "..."
    return f"pid {os.getpid()}, `{command}`"


def acquire_write_lock(path) -> str | None:
    """Take (or share, inside this process) the exclusive write lock of the results file `path`.

    Returns the key to give `release_write_lock`; raises a UserError naming the holder when another
    process holds it. Without `fcntl` (not a POSIX system) nothing is locked and None is returned.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    path = Path(path)
    key = str(path.resolve())
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
        return key
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder_text(fd)
            os.close(fd)
            raise UserError(
                f"{path} is being written by another process ({holder}): wait for it to finish, or give --out another path."
            ) from None
        # the previous holder removes the lock file as it lets go: a lock on a removed file is no lock
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, (_describe_this_process() + "\n").encode())
    _HELD_LOCKS[key] = [fd, 1]
    return key


def release_write_lock(key: str | None) -> None:
    """Give back one use of the lock `acquire_write_lock` returned; the last one removes the lock file."""
    held = _HELD_LOCKS.get(key) if key else None
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD_LOCKS[key]
    fd = held[0]
    try:
        # removed while still locked, so nobody can lock the old file after we let go
        if os.stat(lock_path(key)).st_ino == os.fstat(fd).st_ino:
            os.unlink(lock_path(key))
    except OSError:
        pass
    os.close(fd)


def write_lock_holder(path) -> str | None:
    """Who is writing `path` now ("pid N, `command`"), or None when nobody seems to be.

    Read from the lock file without locking it (a probe lock could make a starting writer fail);
    a lock file left by a killed run names a process that is gone, which counts as nobody.
    """
    if str(Path(path).resolve()) in _HELD_LOCKS:
        return _describe_this_process()
    try:
        text = lock_path(path).read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    try:
        pid = int(text.split(",", 1)[0].split()[1])
        os.kill(pid, 0)
    except (IndexError, ValueError, ProcessLookupError):
        return None
    except PermissionError:  # alive, someone else's
        pass
    return text or None


def canonical_json(config: dict) -> str:
    """The config as JSON with sorted keys, so equal configs give equal strings."""
    return json.dumps(config, sort_keys=True, default=_json_default)


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _defining(config: dict) -> dict:
    """The config without its RECORDED_ONLY keys: what a resume must match."""
    return {k: v for k, v in config.items() if k not in RECORDED_ONLY}


def _as_storable(rows) -> np.ndarray:
    array = np.asarray(rows)
    if array.dtype.kind in ("U", "O"):
        import h5py

        return np.asarray([str(v) for v in array.reshape(-1)], dtype=object).reshape(array.shape), h5py.string_dtype()
    return array, array.dtype


class ResultStore:
    """One HDF5 results file. See the module docstring for the layout and the crash guarantees.

    path: the .h5 file. config: what defines the run (method, model, weights hash, data, options,
    package version); it must contain JSON-serialisable values. A `benchmark` entry (or the
    `benchmark` argument) becomes the root attribute `benchmark`.
    An existing file is resumed when its config equals `config`; a different config raises a
    `UserError` unless `overwrite=True`, which starts the file over.
    `config=None` opens an existing file read-only (for reports).
    environment: what this session computes with (`collect_environment(...)`); by default collected
    here for the CPU with the config's "precision". Recorded at creation and with a resumed
    session's first written rows (opening a finished run to show it records nothing).
    """

    def __init__(self, path, config: dict | None = None, overwrite: bool = False, benchmark: str | None = None,
                 environment: dict | None = None):
        self.path = Path(path)
        self.read_only = config is None
        self._session = None  # what a resumed session records with its first rows
        if self.read_only:
            if not self.path.exists():
                raise UserError(f"No results file at {self.path}: run a benchmark first or check the path.")
            self._recover_read_only()
            self._check_readable()
            with self._open("r") as f:
                self.config = json.loads(f.attrs.get("config", "{}"))
                self.benchmark = str(f.attrs.get("benchmark", ""))
            return
        self.config = json.loads(canonical_json(config))
        self.benchmark = benchmark or str(self.config.get("benchmark", ""))
        # one writer at a time, for as long as this store is open (before anything is read or removed)
        self._lock_key = acquire_write_lock(self.path)
        self._release = weakref.finalize(self, release_write_lock, self._lock_key)
        try:
            self._open_for_writing(overwrite, environment)
        except BaseException:
            self.close()
            raise

    def _open_for_writing(self, overwrite: bool, environment: dict | None):
        if overwrite:
            self.path.unlink(missing_ok=True)
            journal_path(self.path).unlink(missing_ok=True)
        else:
            recover(self.path)  # a change a kill cut short (we hold the lock: its writer is gone)
        if not self.path.exists():
            self._create()
            with self._writing() as f:
                self._record_session(f, self.config, environment)
            return
        self._check_readable()
        with self._open("r") as f:
            stored = f.attrs.get("config")
        old = json.loads(stored) if stored else None
        if old is None or canonical_json(_defining(old)) != canonical_json(_defining(self.config)):
            differing = self._differences(_defining(old or {}), _defining(self.config))
            raise UserError(
                f"{self.path} holds a run with different settings ({differing}): use --overwrite to start over or --out to write elsewhere."
            )
        self._rollback()
        self._session = (self._merge_recorded_only(old), environment)

    def close(self):
        """Let go of the write lock (a read-only store holds none); the store can still be read."""
        release = getattr(self, "_release", None)
        if release is not None:
            release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # ------------------------------------------------------------------ file handling
    def _create(self):
        import h5py

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        # build the empty file beside the target and rename it, so a kill here leaves no half file
        with h5py.File(tmp, "w") as f:
            f.attrs["benchmark"] = self.benchmark
            f.attrs["config"] = canonical_json(self.config)
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["complete"] = False
        os.replace(tmp, self.path)

    def _check_readable(self):
        with self._open("r") as f:
            if "config" not in f.attrs:
                raise UserError(f"{self.path} is not a transexplain results file: use --overwrite to replace it or --out to write elsewhere.")

    #: how often, and how long apart, an open is tried again (a reader can catch a batch half written)
    OPEN_TRIES, OPEN_WAIT_S = 5, 0.2

    def _open(self, mode: str = "r"):
        """The HDF5 file, for reading; it takes no HDF5 file lock, so a reader never blocks the writer."""
        import h5py

        assert mode == "r", "changes go through _writing()"
        for attempt in range(self.OPEN_TRIES):
            try:
                return h5py.File(self.path, "r", locking=False)
            except FileNotFoundError:
                break
            except OSError:
                if attempt + 1 < self.OPEN_TRIES:
                    time.sleep(self.OPEN_WAIT_S)
        raise self._damaged()

    def _damaged(self) -> UserError:
        return UserError(f"{self.path} is damaged or not an HDF5 file: use --overwrite to start the run over.")

    @contextlib.contextmanager
    def _writing(self):
        """The HDF5 file open for one change, undone as a whole unless it completes (see journal.py):
        an exception inside rolls it back at once, a kill leaves the journal for the next open."""
        import h5py

        change = JournaledFile(self.path)
        try:
            f = h5py.File(change, "r+")
        except OSError:
            change.rollback()
            raise self._damaged() from None
        try:
            yield f
        except BaseException:
            try:
                f.close()
            finally:
                change.rollback()
            raise
        f.close()
        change.commit()

    def _recover_read_only(self):
        """A reader that finds the journal of a killed writer (and no live writer) undoes its cut-short change."""
        if not journal_path(self.path).exists() or write_lock_holder(self.path) is not None:
            return
        try:
            key = acquire_write_lock(self.path)
        except UserError:
            return  # a writer started meanwhile: it recovers the file itself
        try:
            recover(self.path)
        finally:
            release_write_lock(key)

    @staticmethod
    def _differences(old: dict, new: dict) -> str:
        """The first three settings that differ, nested ones by their dotted path ("protocol.noise")."""
        missing = object()

        def walk(a, b, path):
            for k in sorted(set(a) | set(b)):
                x, y = a.get(k, missing), b.get(k, missing)
                if isinstance(x, dict) and isinstance(y, dict):
                    yield from walk(x, y, f"{path}{k}.")
                elif x is missing or y is missing or canonical_json({"v": x}) != canonical_json({"v": y}):
                    shown = ["absent" if v is missing else repr(v) for v in (x, y)]
                    yield f"{path}{k}: {shown[0]} in the file vs {shown[1]} now"

        return "; ".join(list(walk(old, new, ""))[:3]) or "unreadable config"

    def _merge_recorded_only(self, old: dict) -> dict:
        """The stored config with this session's RECORDED_ONLY values added (one value: as is; more: a
        list of every value, in order of use). `self.config` keeps the stored one until rows are written."""
        merged = dict(old)
        for key in RECORDED_ONLY:
            if key not in self.config and key not in old:
                continue
            before = old.get(key)
            values = list(before) if isinstance(before, list) else ([] if before is None else [before])
            now = self.config.get(key)
            if now is not None and now not in values:
                values.append(now)
            merged[key] = values[0] if len(values) == 1 else (values or None)
            if key in old:
                self.config[key] = old[key]
            else:
                self.config.pop(key, None)
        return merged

    def _record_session(self, f, config: dict, environment: dict | None):
        """Write `config` (when it changed) and add `environment` to the file's list unless the same
        record is there already; `f` is the file open for writing."""
        if environment is None:
            from .environment import collect_environment

            environment = collect_environment(precision=config.get("precision"))
        if canonical_json(config) != canonical_json(json.loads(f.attrs.get("config", "{}"))):
            f.attrs["config"] = canonical_json(config)
            self.config = json.loads(canonical_json(config))
        record = json.loads(canonical_json(environment))
        raw = f.attrs.get("environment")
        known = json.loads(raw) if raw else []
        if not any(canonical_json(e) == canonical_json(record) for e in known):
            f.attrs["environment"] = canonical_json(known + [record])
        f.flush()

    def _begin_writing(self, f):
        """Before a resumed session's first rows: record its batch size and environment."""
        if self._session is not None:
            config, environment = self._session
            self._session = None
            self._record_session(f, config, environment)

    @property
    def environments(self) -> list:
        """The environment records of the sessions that wrote this file ([] for a file from before they were kept)."""
        with self._open("r") as f:
            raw = f.attrs.get("environment")
        return json.loads(raw) if raw else []

    # ------------------------------------------------------------------ rows
    def done(self, group: str) -> int:
        """Rows committed so far in `group` (0 when the group does not exist)."""
        with self._open("r") as f:
            return self._rows(f, group)

    @staticmethod
    def _rows(f, group: str) -> int:
        """Committed rows of `group`: the write_batch commit when there is one, else the group's own count."""
        if "commit" in f.attrs:
            return int(json.loads(f.attrs["commit"])["rows"].get(group, 0))
        return int(f[group].attrs.get("rows", 0)) if group in f else 0

    def groups(self) -> list[str]:
        """Top-level group names, in creation order is not guaranteed: sorted."""
        with self._open("r") as f:
            return sorted(f.keys())

    def subgroups(self, group: str) -> list[str]:
        """Names of the groups directly under `group`."""
        import h5py

        with self._open("r") as f:
            if group not in f:
                return []
            return sorted(k for k, v in f[group].items() if isinstance(v, h5py.Group))

    def row_groups(self) -> list[str]:
        """Every group (at any depth) that holds rows, by full name ("rollout/pred/positive"), sorted."""
        import h5py

        found = []
        with self._open("r") as f:
            f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Group) and "rows" in obj.attrs else None)
        return sorted(found)

    def names(self, group: str) -> list[str]:
        """Dataset names directly under `group`."""
        import h5py

        with self._open("r") as f:
            if group not in f:
                return []
            return sorted(k for k, v in f[group].items() if isinstance(v, h5py.Dataset))

    def append(self, group: str, rows: dict) -> int:
        """Append one batch: `rows` maps dataset name -> array whose first axis is the batch.

        Every array must have the same length. Returns the committed row count afterwards.
        """
        self._writable()
        with self._writing() as f:
            self._begin_writing(f)
            n = self._append(f, group, rows)
            if "commit" in f.attrs:  # keep a write_batch commit in step, or a reopen would roll this back
                commit = json.loads(f.attrs["commit"])
                commit["rows"][group] = n
                f.flush()
                f.attrs["commit"] = json.dumps(commit, sort_keys=True)
            f.flush()
        return n

    def write_batch(self, rows_by_group: dict, position: int):
        """Append one batch to several groups at once and commit it with the run's `position`.

        rows_by_group: {group: {name: rows}}; position: where the next batch starts (e.g. the
        index of the next input). The commit (root attribute `commit`, one JSON string holding
        `position` and every group's row count) is written last, so a kill before it leaves the
        previous commit in force: reopening the file rolls every group back to it.
        """
        self._writable()
        with self._writing() as f:
            self._begin_writing(f)
            commit = json.loads(f.attrs.get("commit", '{"position": 0, "rows": {}}'))
            for group, rows in rows_by_group.items():
                commit["rows"][group] = self._append(f, group, rows)
            commit["position"] = int(position)
            f.flush()
            f.attrs["commit"] = json.dumps(commit, sort_keys=True)  # the commit point
            f.flush()

    @property
    def position(self) -> int:
        """The `position` of the last committed `write_batch` (0 when none)."""
        with self._open("r") as f:
            return int(json.loads(f.attrs.get("commit", '{"position": 0}'))["position"])

    def _rollback(self):
        """Undo rows written after the last `write_batch` commit (a batch a kill cut short)."""
        import h5py

        with self._open("r") as f:
            if "commit" not in f.attrs:
                return
            committed = json.loads(f.attrs["commit"])["rows"]
            stale = []

            def visit(name, obj):
                if isinstance(obj, h5py.Group) and "rows" in obj.attrs and int(obj.attrs["rows"]) != committed.get(name, 0):
                    stale.append(name)

            f.visititems(visit)
        if stale:
            with self._writing() as f:
                for name in stale:
                    f[name].attrs["rows"] = committed.get(name, 0)
                f.flush()

    def _writable(self):
        if self.read_only:
            raise RuntimeError("this ResultStore was opened read-only")

    @staticmethod
    def _append(f, group: str, rows: dict) -> int:
        arrays = {name: _as_storable(value) for name, value in rows.items()}
        lengths = {a.shape[0] if a.ndim else -1 for a, _ in arrays.values()}
        if len(lengths) != 1 or -1 in lengths:
            raise ValueError(f"append({group!r}) needs arrays with one common first axis, got lengths {sorted(lengths)}")
        n = lengths.pop()
        g = f.require_group(group)
        start = int(g.attrs.get("rows", 0))
        for name, (array, dtype) in arrays.items():
            if name in g:
                ds = g[name]
                if ds.shape[1:] != array.shape[1:]:
                    raise ValueError(f"{group}/{name}: rows of shape {array.shape[1:]} do not fit {ds.shape[1:]}")
            else:
                row_bytes = int(np.prod(array.shape[1:], dtype=np.int64)) * max(1, array.dtype.itemsize)
                chunk_rows = max(1, min(4096, (1 << 20) // max(1, row_bytes)))
                ds = g.create_dataset(name, shape=(0,) + array.shape[1:], maxshape=(None,) + array.shape[1:],
                                      dtype=dtype, chunks=(chunk_rows,) + array.shape[1:])
            # rows past `start` come from a batch that a kill cut short: write over them
            ds.resize(start + n, axis=0)
            if n:
                ds[start:start + n] = array
        g.attrs["rows"] = start + n  # the group's commit point
        return start + n

    def read(self, group: str, name: str) -> np.ndarray:
        """The committed rows of `group/name` (strings come back as Python str)."""
        with self._open("r") as f:
            if group not in f or name not in f[group]:
                raise KeyError(f"{self.path} has no dataset {group}/{name}")
            data = f[group][name][: self._rows(f, group)]
        if data.dtype.kind in ("O", "S"):
            data = np.asarray([v.decode() if isinstance(v, bytes) else str(v) for v in data.reshape(-1)], dtype=object).reshape(data.shape)
        return data

    # ------------------------------------------------------------------ summaries and completion
    def set_summary(self, group: str, summary: dict):
        """Store a JSON-serialisable dict of summary numbers (curves as lists) on `group`."""
        with self._writing() as f:
            g = f.require_group(group)
            g.attrs["summary"] = canonical_json(summary)
            f.flush()

    def summary(self, group: str) -> dict:
        """The dict given to `set_summary` ({} when none)."""
        with self._open("r") as f:
            if group not in f:
                return {}
            return json.loads(f[group].attrs.get("summary", "{}"))

    def set_attr(self, name: str, value):
        """Set one extra root attribute (a str, number or bool)."""
        with self._writing() as f:
            f.attrs[name] = value
            f.flush()

    def attr(self, name: str, default=None):
        with self._open("r") as f:
            value = f.attrs.get(name, default)
        return value.item() if isinstance(value, np.generic) else value

    def mark_complete(self):
        """Declare the run finished; only now does the file count as a complete result."""
        self.set_attr("complete", True)

    @property
    def is_complete(self) -> bool:
        return bool(self.attr("complete", False))
