"""The ImageNet-Segmentation file format (`gtsegs_ijcv.mat`, MATLAB v7.3 = HDF5): lazy reader, writer.

Layout (as in the real file):
- ``/value/img``: (N, 1) object references; each target is a uint8 dataset stored column-major as
  (3, W, H) -> transpose (2, 1, 0) to (H, W, 3);
- ``/value/gt``: (N, 1) references to a MATLAB cell, i.e. a (1, 1) dataset of references whose
  target is the (W, H) mask -> ``f[f[f['/value/gt'][i, 0]][0, 0]]``, transpose to (H, W), {0, 1}.
Extensions written by this project (the real file has none, the reader works without them):
- ``/value/label``: (N, 1) int32 class index per image;
- two-object files: ``/value/gt_b`` (same cell layout) and ``/value/label_b`` for the second object.
Referenced datasets live in the ``/#refs#`` group, as MATLAB does it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import UserError

_HEADER_TEXT = ("MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .")


def _matlab_header() -> bytes:
    text = _HEADER_TEXT.encode("ascii").ljust(116, b" ")
    return text + b"\x00" * 8 + b"\x00\x02" + b"IM"


def write_gtsegs(path, images, masks, labels=None, masks_b=None, labels_b=None) -> Path:
    """Write images (each HxWx3 uint8) and masks (each HxW, {0,1}) in the gtsegs_ijcv.mat layout.

    Atomic: written to a temporary file in the same directory, then renamed over `path`.
    """
    import h5py

    path = Path(path)
    n = len(images)
    if len(masks) != n or (labels is not None and len(labels) != n) or (masks_b is not None and len(masks_b) != n):
        raise ValueError("images, masks and labels must have the same length")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w", userblock_size=512, libver="earliest") as f:
            refs = f.create_group("#refs#")
            value = f.create_group("value")
            ref_dtype = h5py.special_dtype(ref=h5py.Reference)

            def store(name, arr):
                ds = refs.create_dataset(name, data=arr, compression="gzip", compression_opts=4)
                ds.attrs["MATLAB_class"] = np.bytes_("uint8")
                return ds.ref

            def cell_of(name, mask_list):
                col = value.create_dataset(name, (n, 1), dtype=ref_dtype)
                for i, m in enumerate(mask_list):
                    m = np.asarray(m)
                    if m.ndim != 2:
                        raise ValueError(f"mask {i} must be 2-D, got shape {m.shape}")
                    target = store(f"{name}_{i:06d}", (m != 0).astype(np.uint8).T)  # (W, H)
                    cell = refs.create_dataset(f"{name}_cell_{i:06d}", (1, 1), dtype=ref_dtype)
                    cell[0, 0] = target
                    cell.attrs["MATLAB_class"] = np.bytes_("cell")
                    col[i, 0] = cell.ref
                col.attrs["MATLAB_class"] = np.bytes_("cell")

            img_col = value.create_dataset("img", (n, 1), dtype=ref_dtype)
            for i, im in enumerate(images):
                im = np.asarray(im)
                if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
                    raise ValueError(f"image {i} must be HxWx3 uint8, got {im.shape} {im.dtype}")
                img_col[i, 0] = store(f"img_{i:06d}", np.ascontiguousarray(im.transpose(2, 1, 0)))  # (3, W, H)
            img_col.attrs["MATLAB_class"] = np.bytes_("cell")
            cell_of("gt", masks)
            if masks_b is not None:
                cell_of("gt_b", masks_b)
            for name, labs in (("label", labels), ("label_b", labels_b)):
                if labs is not None:
                    ds = value.create_dataset(name, data=np.asarray(labs, dtype=np.int32).reshape(n, 1))
                    ds.attrs["MATLAB_class"] = np.bytes_("int32")
        with open(tmp, "r+b") as fh:
            fh.write(_matlab_header())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _hdf5_reason(err: Exception) -> str:
    text = str(err)
    if "truncated file" in text:
        return "it is truncated, e.g. by an interrupted download or copy"
    if "signature not found" in text:
        return "its HDF5 signature is missing"
    return f"HDF5 cannot read it: {text}"


def damaged_file_error(path: Path, reason: str) -> UserError:
    """One sentence for a damaged gtsegs-format file, saying how to get a good one again."""
    from . import shapes

    path = Path(path)
    try:
        embedded = shapes.cache_root().resolve() in path.resolve().parents
    except OSError:
        embedded = False
    if embedded:
        return UserError(f"The embedded shapes file {path} is damaged ({reason}): run `tx-bench data make` to "
                         f"regenerate it (or delete {path.parent}).")
    return UserError(f"{path} is damaged ({reason}): download or copy it again (or, for a file written by "
                     f"`tx-bench data make --out DIR`, run that command again).")


class GtSegsDataset:
    """Lazy reader of a gtsegs_ijcv.mat-format file: `ds[i] -> (image HxWx3 uint8, mask HxW uint8, label)`.

    The HDF5 file is opened on first access in each process (DataLoader workers open their own)
    and items are read one at a time; label is -1 when the file carries no labels. With
    `second=True` (two-object files) items are those of the second object: mask `/value/gt_b` and
    label `/value/label_b`.
    """

    def __init__(self, path, second: bool = False):
        import h5py

        self.path = Path(path)
        self.second = second
        if not self.path.exists():
            raise UserError(f"No segmentation file at {self.path}: give the path of gtsegs_ijcv.mat (or run `tx-bench data make`).")
        if self.path.is_dir():
            raise UserError(f"{self.path} is a folder, not a MATLAB v7.3 (HDF5) file: give the path of gtsegs_ijcv.mat itself.")
        try:
            with open(self.path, "rb") as fh:
                head = fh.read(len(_HEADER_TEXT))
        except OSError as err:
            raise UserError(f"Cannot read {self.path} ({(err.strerror or type(err).__name__).lower()}): make it readable or give another file.") from None
        if not h5py.is_hdf5(str(self.path)):
            if not head or head.startswith(b"MATLAB 7.3"):
                raise damaged_file_error(self.path, "it is empty" if not head else
                                         f"it is truncated to {self.path.stat().st_size} bytes")
            raise UserError(f"{self.path} is not a MATLAB v7.3 (HDF5) file: give gtsegs_ijcv.mat as distributed.")
        gt_name = "gt_b" if second else "gt"
        try:
            self._read_layout(gt_name, second)
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            raise damaged_file_error(self.path, _hdf5_reason(err)) from None
        self._file = None
        self._pid = None

    def _read_layout(self, gt_name: str, second: bool) -> None:
        import h5py

        with h5py.File(self.path, "r") as f:
            for name in ("img", gt_name):
                if f"/value/{name}" not in f:
                    raise UserError(f"{self.path} has no /value/{name} dataset: it is not in the gtsegs_ijcv.mat layout.")
            self._n = int(f["/value/img"].shape[0])
            if f[f"/value/{gt_name}"].shape[0] != self._n:
                raise UserError(f"{self.path} has {self._n} images but {f[f'/value/{gt_name}'].shape[0]} masks: the file is damaged.")
            label_name = "label_b" if second else "label"
            self.has_labels = f"/value/{label_name}" in f
            self.has_second = "/value/gt_b" in f
        self._gt_name, self._label_name = gt_name, label_name

    def __len__(self) -> int:
        return self._n

    def _h5(self):
        import h5py

        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def image(self, i: int) -> np.ndarray:
        f = self._h5()
        return np.ascontiguousarray(np.asarray(f[f["/value/img"][i, 0]]).transpose(2, 1, 0))

    def mask(self, i: int, name: str | None = None) -> np.ndarray:
        f = self._h5()
        cell = f[f[f"/value/{name or self._gt_name}"][i, 0]]
        return np.ascontiguousarray(np.asarray(f[cell[0, 0]]).T).astype(np.uint8)

    def label(self, i: int, name: str | None = None) -> int:
        name = name or self._label_name
        f = self._h5()
        if f"/value/{name}" not in f:
            return -1
        return int(f[f"/value/{name}"][i, 0])

    def __getitem__(self, i: int):
        if not -self._n <= i < self._n:
            raise IndexError(f"index {i} out of range for {self._n} items")
        i = i % self._n
        return self.image(i), self.mask(i), self.label(i)

    def two_objects(self, i: int):
        """(image, mask_a, label_a, mask_b, label_b) of a two-object file."""
        if not self.has_second:
            raise UserError(f"{self.path} has no second-object masks (/value/gt_b): it is not a two-object file.")
        return self.image(i), self.mask(i, "gt"), self.label(i, "label"), self.mask(i, "gt_b"), self.label(i, "label_b")

    def close(self):
        if self._file is not None:
            self._file.close()
        self._file = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"], state["_pid"] = None, None
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
