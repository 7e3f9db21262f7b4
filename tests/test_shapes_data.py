"""The procedural shapes data set: determinism, sanity, the cached default, the CLI."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from transexplain.data import shapes
from transexplain.data.gtsegs import GtSegsDataset

SMALL = dict(n_val=20, n_seg=10, n_two=6)


def _png_hashes(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "val").rglob("*.png"))}


def _arrays(path):
    ds = GtSegsDataset(path)
    out = [ds.two_objects(i) if ds.has_second else ds[i] for i in range(len(ds))]
    ds.close()
    return out


@pytest.fixture(scope="module")
def two_gens(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("gen_a"), tmp_path_factory.mktemp("gen_b")
    shapes.generate(a, seed=7, **SMALL)
    shapes.generate(b, seed=7, **SMALL)
    return a, b


def test_same_seed_same_bytes(two_gens):
    a, b = two_gens
    ha, hb = _png_hashes(a), _png_hashes(b)
    assert len(ha) == SMALL["n_val"] and ha == hb
    for name in (shapes.SEG_FILE, shapes.TWO_FILE):
        for xa, xb in zip(_arrays(a / name), _arrays(b / name), strict=True):
            for u, v in zip(xa, xb, strict=True):
                np.testing.assert_array_equal(u, v)
    assert json.loads((a / shapes.MARKER).read_text())["hash"] == json.loads((b / shapes.MARKER).read_text())["hash"]
    assert shapes.verify(a)


def test_other_seed_differs(tmp_path, two_gens):
    shapes.generate(tmp_path, seed=8, n_val=20, n_seg=0, n_two=0)
    assert _png_hashes(tmp_path) != _png_hashes(two_gens[0])


def test_image_folder_layout_and_balance(two_gens):
    root = two_gens[0]
    assert sorted(p.name for p in (root / "val").iterdir()) == shapes.CLASSES == sorted(shapes.CLASSES)
    counts = [len(list((root / "val" / c).glob("*.png"))) for c in shapes.CLASSES]
    assert counts == [SMALL["n_val"] // 10] * 10
    from PIL import Image

    im = Image.open(next((root / "val" / "star").glob("*.png")))
    assert im.mode == "RGB" and im.size == (112, 112)


def test_seg_masks_are_objects(two_gens):
    ds = GtSegsDataset(two_gens[0] / shapes.SEG_FILE)
    assert len(ds) == SMALL["n_seg"]
    labels = []
    for img, mask, label in (ds[i] for i in range(len(ds))):
        assert img.shape == (112, 112, 3) and mask.shape == (112, 112)
        assert 150 < mask.sum() < 0.5 * mask.size
        labels.append(label)
        # the object is a flat colour (plus slight shading) that differs from what surrounds it
        inside = img[mask == 1].astype(float)
        assert inside.std(0).max() < 15
    assert sorted(labels) == sorted(list(range(10)) * (SMALL["n_seg"] // 10))


def test_two_objects(two_gens):
    ds = GtSegsDataset(two_gens[0] / shapes.TWO_FILE)
    assert len(ds) == SMALL["n_two"] and ds.has_second
    for i in range(len(ds)):
        _, ma, la, mb, lb = ds.two_objects(i)
        assert la != lb and 0 <= la < 10 and 0 <= lb < 10
        assert ma.sum() > 100 and mb.sum() > 100
        assert (ma & mb).sum() == 0


def test_each_class_mask_is_its_shape():
    # the same pose gives different masks for different classes (the classes are distinguishable)
    masks = [shapes.shape_mask(k, 56, 56, 30, 0.3) for k in range(10)]
    for i in range(10):
        for j in range(i + 1, 10):
            iou = (masks[i] & masks[j]).sum() / (masks[i] | masks[j]).sum()
            assert iou < 0.9, (shapes.CLASSES[i], shapes.CLASSES[j], iou)


def test_embedded_cache_is_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSEXPLAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(shapes, "DEFAULT_SIZES", {"n_val": 10, "n_seg": 4, "n_two": 2})
    with ThreadPoolExecutor(3) as pool:  # concurrent first uses
        roots = list(pool.map(lambda _: shapes.embedded_data_dir(), range(3)))
    assert len(set(roots)) == 1 and roots[0] == tmp_path / "shapes-v1-seed0"
    assert [p.name for p in tmp_path.iterdir()] == ["shapes-v1-seed0"]  # no temp dirs left
    assert shapes.verify(roots[0])
    paths = shapes.embedded_paths()
    assert paths["val"].is_dir() and paths["seg"].is_file() and paths["two"].is_file()
    assert paths["classes"] == shapes.CLASSES
    # a set without its marker counts as unfinished and is regenerated
    (roots[0] / shapes.MARKER).unlink()
    assert shapes.embedded_data_dir() == roots[0] and shapes.verify(roots[0])
    # a set drawn by an older generator revision is regenerated too
    marker = roots[0] / shapes.MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "generator": -1}))
    assert shapes.embedded_data_dir() == roots[0]
    assert json.loads(marker.read_text())["generator"] == shapes.GENERATOR_REV


def test_cli_make(tmp_path):
    from typer.testing import CliRunner

    from transexplain.cli import app

    out = tmp_path / "set"
    result = CliRunner().invoke(app, ["data", "make", "--out", str(out), "--n", "10", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert len(list((out / "val").rglob("*.png"))) == 10
    assert len(GtSegsDataset(out / shapes.SEG_FILE)) == 6 and len(GtSegsDataset(out / shapes.TWO_FILE)) == 3


def test_object_colour_does_not_tell_the_class():
    """Every class is drawn in hues from all around the wheel: colour cannot decide the class."""
    import colorsys

    sextants = {k: set() for k in range(10)}
    for k in range(10):
        for i in range(24):
            img, mask = shapes.draw_one(k, seed=5, split="train", index=100 * k + i)
            r, g, b = img[mask == 1].reshape(-1, 3).mean(0) / 255.0
            sextants[k].add(int(colorsys.rgb_to_hsv(r, g, b)[0] * 6) % 6)
    assert all(len(v) >= 5 for v in sextants.values()), sextants
