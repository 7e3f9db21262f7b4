"""Batches of a data set's items, decoded and resized by `DataLoader` worker processes, in the order asked.

A data set here is anything with `load(i)` (the preprocessed item, or None when it cannot be read)
and `len()`; an item is a tensor or a tuple of tensors / arrays (an image and its mask). The
batches come in the order of the index list whatever the number of workers (the DataLoader keeps
its batches in order), so a run's records do not depend on `--num-workers`. On CUDA the batches
are pinned and the next ones prefetched while the model computes.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

#: the most worker processes a default gives one process (more rarely helps a single GPU)
MAX_DEFAULT_WORKERS = 8


def available_cpus() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    """Decoding workers for one process: its share of the cores (under torchrun, the cores are
    shared by the processes of the machine) less one for the process itself, at most 8."""
    per_process = available_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(MAX_DEFAULT_WORKERS, per_process - 1))


@dataclass
class Batch:
    """One batch: the readable items stacked, their data-set indices, and the indices that could not be read.

    position: how many indices of the run's list are done after this batch (the resume point).
    """

    indices: list
    items: object  # a stacked tensor, a tuple of them, or None when no item was readable
    skipped: list
    position: int
    converted: list = field(default_factory=list)  # indices whose image was converted to RGB

    def pin_memory(self):
        self.items = _map(self.items, lambda t: t.pin_memory())
        return self


def _map(items, fn):
    if items is None:
        return None
    if isinstance(items, tuple):
        return tuple(fn(t) for t in items)
    return fn(items)


def _stack(values: list):
    first = values[0]
    if isinstance(first, tuple):
        return tuple(_stack([v[k] for v in values]) for k in range(len(first)))
    if isinstance(first, np.ndarray):
        return torch.from_numpy(np.stack(values))
    return torch.stack(values)


class _Items(torch.utils.data.Dataset):
    """Wraps a data set so that a worker returns (index, item or None, converted-to-RGB flag)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        item = self.source.load(i)
        converted = i in getattr(self.source, "converted", ())
        return i, item, converted


class _Collate:
    """Stacks a batch in the worker (so the main process only moves it) and records its resume point."""

    def __init__(self, positions: dict):
        self.positions = positions  # first index of a batch -> position after it

    def __call__(self, rows):
        good = [(i, item) for i, item, _ in rows if item is not None]
        return Batch(indices=[i for i, _ in good], items=_stack([item for _, item in good]) if good else None,
                     skipped=[i for i, item, _ in rows if item is None], position=self.positions[rows[0][0]],
                     converted=[i for i, _, flag in rows if flag])


class BatchLoader:
    """Iterate `Batch`es over `indices` (a list or range of data-set indices) in chunks of `batch_size`.

    num_workers: decoding processes (0: decode in this process). pin_memory: pin the batches (for a
    CUDA device). `load_s` adds up the time this process waited for a batch: the load part of the
    load / explain split.
    """

    def __init__(self, source, indices, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                 position: int = 0):
        self.source = source
        chunks = [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
        positions = {chunk[0]: position + min(len(indices), (k + 1) * batch_size) for k, chunk in enumerate(chunks)}
        self.loader = torch.utils.data.DataLoader(
            _Items(source), batch_sampler=chunks, collate_fn=_Collate(positions), num_workers=num_workers,
            pin_memory=pin_memory, prefetch_factor=4 if num_workers else None,
            # workers live for one pass; a fork is cheap and needs nothing pickled
            multiprocessing_context="fork" if num_workers and "fork" in _start_methods() else None)
        self.load_s = 0.0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        converted = getattr(self.source, "converted", None)
        it = iter(self.loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.load_s += time.perf_counter() - t0
            if converted is not None:
                converted.update(batch.converted)  # the workers' copies of the set are lost with them
            yield batch


def _start_methods() -> list:
    import multiprocessing

    return multiprocessing.get_all_start_methods()
