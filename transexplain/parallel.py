"""Work spread over threads: for calls that let go of Python's GIL (ATen's CPU kernels, SciPy's SuperLU).

One place for the pattern the package uses where a loop of independent CPU calls would leave cores
idle: CPU noise draws with one generator each (SmoothGrad, ROAD, infidelity, max-sensitivity) and
SciPy's per-image sparse solves (ROAD on a CPU). Each item is computed alone, in the order of its own
inputs, so the threads change no number.
"""
from __future__ import annotations

import torch


def thread_map(fn, items) -> list:
    """[fn(item) for item in items], in up to `torch.get_num_threads()` threads (results in order)."""
    items = list(items)
    workers = min(len(items), torch.get_num_threads())
    if workers <= 1:
        return [fn(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


_BACKGROUND = None


def in_background(fn, *args, **kwargs):
    """Start fn(*args, **kwargs) in a background thread; returns its Future (`.result()` waits).

    For CPU work that can run while this thread drives a GPU (ROAD's CPU noise draws during its solve):
    the work is the same as called in place, so the numbers are too."""
    global _BACKGROUND
    if _BACKGROUND is None:
        from concurrent.futures import ThreadPoolExecutor

        _BACKGROUND = ThreadPoolExecutor(1, thread_name_prefix="transexplain-background")
    return _BACKGROUND.submit(fn, *args, **kwargs)
