"""Checks on a results file's path before a run starts writing it (one sentence per problem)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import UserError


def _reason(err: OSError) -> str:
    return (err.strerror or type(err).__name__).lower()


def check_output_path(path, option: str = "--out") -> Path:
    """`path` if a results file can be created or appended there; else a UserError naming it.

    Refused: a path that is a folder, a path under a plain file, an existing file that cannot be
    opened for writing, and a folder in which no file can be created (the store writes a
    temporary file beside the result, so the folder must be writable even on a resume).
    Creates nothing that stays: the folder's writability is probed with a temporary file.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder, not a results file: give a file name such as {path / 'results.h5'}.")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"Cannot write {path}: {folder} is a file, not a folder; give {option} a path in a folder.")
    if path.exists():
        try:
            with open(path, "r+b"):
                pass
        except OSError as err:
            raise UserError(f"Cannot write {path} ({_reason(err)}): make the file writable or give {option} another path.") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".tx-bench-write-check-", dir=folder)
    except OSError as err:
        raise UserError(
            f"Cannot write {path}: the folder {folder} is not writable ({_reason(err)}); give {option} a path in a writable folder."
        ) from None
    os.close(fd)
    os.unlink(probe)
    return path
