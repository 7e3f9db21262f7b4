"""The gtsegs_ijcv.mat-format writer and lazy reader."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pickle

import h5py
import numpy as np
import pytest

from transexplain.data import shapes
from transexplain.data.gtsegs import GtSegsDataset, write_gtsegs
from transexplain.errors import UserError


@pytest.fixture(scope="module")
def small_set():
    labels = shapes.balanced_labels(6, 0, "seg")
    drawn = [shapes.draw_one(int(lab), 0, "seg", i) for i, lab in enumerate(labels)]
    # one non-square image, to catch a transposition mistake
    rect = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    rect_mask = np.zeros((5, 7), np.uint8)
    rect_mask[1:3, 2:6] = 1
    images = [d[0] for d in drawn] + [rect]
    masks = [d[1] for d in drawn] + [rect_mask]
    return images, masks, list(labels) + [3]


def test_round_trip(tmp_path, small_set):
    images, masks, labels = small_set
    path = write_gtsegs(tmp_path / "gt.mat", images, masks, labels=labels)
    ds = GtSegsDataset(path)
    assert len(ds) == len(images) and ds.has_labels and not ds.has_second
    for i in range(len(images)):
        im, m, lab = ds[i]
        assert im.dtype == np.uint8 and m.dtype == np.uint8
        np.testing.assert_array_equal(im, images[i])
        np.testing.assert_array_equal(m, masks[i])
        assert lab == labels[i]
    assert set(np.unique(ds[0][1])) <= {0, 1}
    with pytest.raises(IndexError):
        ds[len(images)]
    # no temporary file left behind
    assert [p.name for p in tmp_path.iterdir()] == ["gt.mat"]


def test_raw_structure_is_the_real_layout(tmp_path, small_set):
    images, masks, labels = small_set
    path = write_gtsegs(tmp_path / "gt.mat", images, masks, labels=labels)
    assert path.read_bytes()[:19] == b"MATLAB 7.3 MAT-file"
    with h5py.File(path, "r") as f:
        img_col, gt_col = f["/value/img"], f["/value/gt"]
        assert img_col.shape == (len(images), 1) and gt_col.shape == (len(images), 1)
        assert h5py.check_dtype(ref=img_col.dtype) is h5py.Reference
        k = len(images) - 1  # the 5x7 image
        raw = f[img_col[k, 0]]
        assert raw.shape == (3, 7, 5) and raw.dtype == np.uint8  # column-major (3, W, H)
        np.testing.assert_array_equal(np.asarray(raw).transpose(2, 1, 0), images[k])
        cell = f[gt_col[k, 0]]
        assert cell.shape == (1, 1) and h5py.check_dtype(ref=cell.dtype) is h5py.Reference
        raw_mask = f[f[f["/value/gt"][k, 0]][0, 0]]
        assert raw_mask.shape == (7, 5)
        np.testing.assert_array_equal(np.asarray(raw_mask).T, masks[k])


def test_reader_without_labels_and_second_object(tmp_path, small_set):
    images, masks, labels = small_set
    plain = GtSegsDataset(write_gtsegs(tmp_path / "plain.mat", images, masks))
    assert not plain.has_labels and plain[0][2] == -1
    two = write_gtsegs(tmp_path / "two.mat", images, masks, labels=labels, masks_b=masks[::-1], labels_b=labels[::-1])
    ds_b = GtSegsDataset(two, second=True)
    np.testing.assert_array_equal(ds_b[0][1], masks[-1])
    assert ds_b[0][2] == labels[-1]
    _, ma, la, mb, lb = GtSegsDataset(two).two_objects(1)
    np.testing.assert_array_equal(ma, masks[1])
    np.testing.assert_array_equal(mb, masks[-2])
    assert (la, lb) == (labels[1], labels[-2])


def test_lazy_and_picklable(tmp_path, small_set):
    images, masks, labels = small_set
    ds = GtSegsDataset(write_gtsegs(tmp_path / "gt.mat", images, masks, labels=labels))
    assert ds._file is None  # nothing opened until an item is read
    ds[0]
    assert ds._file is not None
    clone = pickle.loads(pickle.dumps(ds))  # what a DataLoader worker receives
    assert clone._file is None
    np.testing.assert_array_equal(clone[2][0], images[2])
    ds.close()


def test_bad_files_are_user_errors(tmp_path, small_set):
    with pytest.raises(UserError, match="No segmentation file"):
        GtSegsDataset(tmp_path / "missing.mat")
    junk = tmp_path / "junk.mat"
    junk.write_bytes(b"MATLAB 5.0 MAT-file, not HDF5" + b"\0" * 200)
    with pytest.raises(UserError, match="not a MATLAB v7.3"):
        GtSegsDataset(junk)
    with pytest.raises(UserError, match="not a MATLAB v7.3"):
        GtSegsDataset(tmp_path)
    other = tmp_path / "other.mat"
    with h5py.File(other, "w") as f:
        f.create_dataset("/value/img", data=np.zeros((2, 1)))
    with pytest.raises(UserError, match="/value/gt"):
        GtSegsDataset(other)
    with pytest.raises(UserError, match="/value/gt_b"):
        GtSegsDataset(write_gtsegs(tmp_path / "one.mat", *small_set[:2]), second=True)
