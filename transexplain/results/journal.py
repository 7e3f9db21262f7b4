"""An undo journal for in-place changes to a results file, so that a process killed while HDF5 is
writing (SIGKILL, SIGTERM from torchrun, the OOM killer) never leaves a damaged file.

HDF5 changes a file in place: a batch of rows rewrites the superblock, object headers, B-tree nodes
and the heap as well as adding data, and a kill between two of those writes leaves metadata that
points at the wrong bytes ("bad heap index" on the next write). HDF5 has no crash recovery of its
own, so the writer gives HDF5 a file object (h5py's file-object driver) that keeps, before any byte
that existed when the change began is overwritten or cut off, a copy of the old bytes in a sidecar
file `<results>.journal`. A change is committed by removing the journal once HDF5 has closed the
file; a journal found on open means a change was cut short, and `recover` writes the old bytes
back and cuts the file to its old length, which gives the file exactly as the last completed
change left it (byte for byte). Recovery is idempotent: a kill during it is recovered again.

The journal is written with unbuffered `os.write` before the data it protects, so it survives a
killed process (the kernel keeps both in order in its page cache). A power cut or an operating
system crash is not covered: that would need an fsync per change.

Journal layout: a 32-byte header (magic, the data file's length, device and inode when the change
began) and records `(offset u64, length u64, crc32 u32, old bytes)`. A record cut short at the end
of the journal (a kill while the journal was written) protects nothing yet written, and is ignored.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

MAGIC = b"TXJRNL01"
_HEADER = struct.Struct("<8sQQQ")  # magic, original length, st_dev, st_ino
_RECORD = struct.Struct("<QQI")  # offset, length, crc32 of the old bytes

#: a test hook: "k" SIGKILLs this process at the k-th data write of a change (1-based, after its
#: journal record); "c:k" at the k-th write of the c-th change this process makes
KILL_ENV = "TX_BENCH_KILL_AT_WRITE"


def _kill_point():
    """The (change, write) at which `KILL_ENV` asks this process to die, change None meaning any."""
    value = os.environ.get(KILL_ENV)
    if not value:
        return None
    change, _, write = value.rpartition(":")
    return (int(change) if change else None), int(write)


def journal_path(path) -> Path:
    """The sidecar undo journal of the results file `path`: `<path>.journal`."""
    path = Path(path)
    return path.with_name(path.name + ".journal")


def _read_records(data: bytes):
    """The complete, intact records of a journal's bytes after the header."""
    pos = _HEADER.size
    while pos + _RECORD.size <= len(data):
        offset, length, crc = _RECORD.unpack_from(data, pos)
        start, end = pos + _RECORD.size, pos + _RECORD.size + length
        old = data[start:end]
        if len(old) != length or zlib.crc32(old) != crc:
            break  # cut short by a kill: its data write never happened
        yield offset, old
        pos = end


def recover(path) -> bool:
    """Undo a change to `path` that a kill cut short, if its journal is there; True when one was undone.

    The caller must hold the file's write lock (no live writer). A journal that does not belong to
    this file (another inode, e.g. the file was replaced since) or whose header was never completed
    protects nothing and is removed.
    """
    path, journal = Path(path), journal_path(path)
    try:
        data = journal.read_bytes()
    except FileNotFoundError:
        return False
    undone = False
    if len(data) >= _HEADER.size and path.exists():
        magic, length, dev, ino = _HEADER.unpack_from(data)
        st = os.stat(path)
        if magic == MAGIC and (st.st_dev, st.st_ino) == (dev, ino):
            fd = os.open(path, os.O_RDWR)
            try:
                for offset, old in _read_records(data):
                    os.pwrite(fd, old, offset)
                os.ftruncate(fd, length)
                os.fsync(fd)
            finally:
                os.close(fd)
            undone = True
    journal.unlink(missing_ok=True)
    return undone


class JournaledFile(io.RawIOBase):
    """The results file opened for one change, as a binary file object for h5py.

    Every write or truncation first saves, once per byte, what it replaces among the bytes the file
    had when the change began; `commit()` ends the change (the journal is removed), `rollback()`
    undoes it. Close the h5py file before either.
    """

    #: changes begun in this process (for the test hook)
    changes = 0

    def __init__(self, path):
        super().__init__()
        self.path = Path(path)
        self.journal = journal_path(self.path)
        self._fd = os.open(self.path, os.O_RDWR)
        st = os.fstat(self._fd)
        self._length = st.st_size  # bytes that existed when the change began
        self._saved: list[tuple[int, int]] = []  # sorted, disjoint ranges already in the journal
        self._jfd = None
        self._pos = 0
        self._writes = 0
        JournaledFile.changes += 1
        kill = _kill_point()
        self._kill_at = kill[1] if kill and kill[0] in (None, JournaledFile.changes) else None
        header = _HEADER.pack(MAGIC, self._length, st.st_dev, st.st_ino)
        self._jfd = os.open(self.journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self._jfd, header)  # before the first change to the file

    # ------------------------------------------------------------------ file object protocol
    def readable(self):
        return True

    def writable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buffer) -> int:
        data = os.pread(self._fd, len(buffer), self._pos)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self._pos = offset
        elif whence == io.SEEK_CUR:
            self._pos += offset
        else:
            self._pos = os.fstat(self._fd).st_size + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        self._save(self._pos, self._pos + len(data))
        self._writes += 1
        if self._kill_at is not None and self._writes == self._kill_at:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        written = os.pwrite(self._fd, data, self._pos)
        self._pos += written
        return written

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        self._save(size, self._length)
        os.ftruncate(self._fd, size)
        return size

    def flush(self):
        pass

    # ------------------------------------------------------------------ the journal
    def _save(self, start: int, end: int):
        """Journal the old bytes of [start, end) that existed at the start and are not saved yet."""
        end = min(end, self._length)
        if start >= end:
            return
        gaps, cursor = [], start
        for s, e in self._saved:
            if e <= cursor:
                continue
            if s >= end:
                break
            if s > cursor:
                gaps.append((cursor, s))
            cursor = max(cursor, e)
        if cursor < end:
            gaps.append((cursor, end))
        for s, e in gaps:
            old = os.pread(self._fd, e - s, s)
            os.write(self._jfd, _RECORD.pack(s, len(old), zlib.crc32(old)) + old)
        if gaps:
            merged = sorted(self._saved + gaps)
            self._saved = []
            for s, e in merged:
                if self._saved and s <= self._saved[-1][1]:
                    self._saved[-1] = (self._saved[-1][0], max(self._saved[-1][1], e))
                else:
                    self._saved.append((s, e))

    def _close_fds(self):
        for name in ("_fd", "_jfd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)
        super().close()

    def commit(self):
        """The change is complete: close the file and remove the journal (the commit point)."""
        self._close_fds()
        self.journal.unlink(missing_ok=True)

    def rollback(self):
        """Undo the change (an error inside it): the file as it was when the change began."""
        self._close_fds()
        recover(self.path)

    def close(self):
        """Closing without `commit` leaves the journal, so the change is undone on the next open."""
        if not self.closed:
            self._close_fds()
