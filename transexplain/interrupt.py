"""What a Ctrl-C should tell the user: how far the running benchmark got.

Runners call `progress(done, total)` once before their loop and again after each batch is safely
written; `cli.main()` turns a Ctrl-C into exit code 130 and prints `message()`, e.g.
"Interrupted after 64 of 300 images; run the same command again to resume."
The record is per process and holds only the latest call.
"""
from __future__ import annotations

_STATE: dict = {"done": None, "total": None, "unit": "images"}


def progress(done: int, total: int, unit: str = "images") -> None:
    """Record that `done` of `total` items (`unit`: "images", "documents", ...) are safely stored."""
    _STATE.update(done=int(done), total=int(total), unit=str(unit))


def reset() -> None:
    """Forget the recorded progress (called at the start of each command)."""
    _STATE.update(done=None, total=None, unit="images")


def current() -> tuple | None:
    """(done, total, unit) as last recorded, or None when nothing was recorded."""
    if _STATE["done"] is None or _STATE["total"] is None:
        return None
    return _STATE["done"], _STATE["total"], _STATE["unit"]


def message() -> str:
    """The one line shown after a Ctrl-C."""
    record = current()
    if record is None:
        return "Interrupted."
    done, total, unit = record
    return f"Interrupted after {done} of {total} {unit}; run the same command again to resume."
