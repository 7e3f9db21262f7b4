"""The embedded default data set "shapes-v1": procedural images with one (or two) known objects.

Every image is drawn from its own numpy Generator seeded by (seed, split, index), so a set is
byte-for-byte reproducible and any single image can be redrawn alone. An image is 112x112 RGB: a
cluttered background (gradient, smooth colour noise, pixel noise, small distractor ellipses and
lines that are never one of the class shapes) with a foreground object of one of ten shape classes
in a random size, rotation and position, painted in a random saturated colour (any hue, random
saturation and brightness, chosen to stand out from the background under it): only the shape
tells the class. The object's exact pixel mask is known.

On disk, in the formats of the real benchmarks:
- ``val/<class_name>/<id>.png``: the validation set as an image folder (sorted class names = index);
- ``shapes_seg.mat``: the segmentation set in the ``gtsegs_ijcv.mat`` layout (see ``gtsegs.py``),
  plus the optional ``/value/label``;
- ``shapes_two_objects.mat``: two objects of different classes per image, same layout, with the
  second object's mask in ``/value/gt_b`` and labels in ``/value/label`` / ``/value/label_b``;
- ``classes.txt`` and ``.complete`` (a JSON marker with the sizes and a content hash).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

VERSION = "shapes-v1"
SIZE = 112
#: class names in index order (sorted, so an image folder's sorted sub-folders give the same order)
CLASSES = ["arrow", "circle", "crescent", "cross", "diamond", "hexagon", "ring", "square", "star", "triangle"]
DEFAULT_SIZES = {"n_val": 300, "n_seg": 200, "n_two": 100}
MARKER = ".complete"
SEG_FILE = "shapes_seg.mat"
TWO_FILE = "shapes_two_objects.mat"
#: revision of the drawing code; a cached set drawn by another revision is regenerated
GENERATOR_REV = 3
_SPLIT_IDS = {"val": 1, "seg": 2, "two": 3, "train": 4}


# ---------------------------------------------------------------- geometry (unit radius, centred)
def _regular(n, radius=1.0, phase=0.0):
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], 1)


def _star(points=5, inner=0.42):
    outer = _regular(points, 1.0, -np.pi / 2)
    inn = _regular(points, inner, -np.pi / 2 + np.pi / points)
    return np.stack([outer, inn], 1).reshape(-1, 2)


_W = 0.3  # half-width of the cross's arms
_SHAPES = {
    # name: (filled polygons, hole polygons), all in unit coordinates
    "arrow": ([np.array([(-1, -0.22), (0.15, -0.22), (0.15, -0.6), (1, 0), (0.15, 0.6), (0.15, 0.22), (-1, 0.22)])], []),
    "circle": ([_regular(64)], []),
    "crescent": ([_regular(64)], [_regular(64, 0.82) + np.array([0.42, 0.0])]),
    "cross": ([np.array([(-_W, -1), (_W, -1), (_W, -_W), (1, -_W), (1, _W), (_W, _W), (_W, 1), (-_W, 1),
                         (-_W, _W), (-1, _W), (-1, -_W), (-_W, -_W)])], []),
    "diamond": ([np.array([(0, -1), (0.52, 0), (0, 1), (-0.52, 0)])], []),
    "hexagon": ([_regular(6)], []),
    "ring": ([_regular(64)], [_regular(64, 0.55)]),
    "square": ([np.array([(-0.78, -0.78), (0.78, -0.78), (0.78, 0.78), (-0.78, 0.78)])], []),
    "star": ([_star()], []),
    "triangle": ([_regular(3, 1.0, -np.pi / 2) + np.array([0.0, 0.2])], []),
}
assert sorted(_SHAPES) == CLASSES


def _transform(poly, cx, cy, r, angle):
    c, s = np.cos(angle), np.sin(angle)
    x = poly[:, 0] * c - poly[:, 1] * s
    y = poly[:, 0] * s + poly[:, 1] * c
    return [(float(cx + r * a), float(cy + r * b)) for a, b in zip(x, y)]


def shape_mask(label: int, cx: float, cy: float, r: float, angle: float, size: int = SIZE) -> np.ndarray:
    """Boolean (size, size) mask of shape class `label` centred at (cx, cy) with radius r."""
    filled, holes = _SHAPES[CLASSES[label]]
    im = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(im)
    for p in filled:
        d.polygon(_transform(p, cx, cy, r, angle), fill=255)
    for p in holes:
        d.polygon(_transform(p, cx, cy, r, angle), fill=0)
    return np.asarray(im) > 127


# ---------------------------------------------------------------- drawing
def _background(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    base = rng.uniform(60, 190, 3)
    # linear gradient in a random direction
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    ramp = (np.cos(ang) * xx + np.sin(ang) * yy)[..., None] * rng.uniform(-50, 50, 3)
    # smooth colour noise (a small random grid upsampled bilinearly)
    g = int(rng.integers(3, 9))
    coarse = rng.uniform(0, 255, (g, g, 3)).astype(np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR), dtype=np.float64)
    smooth = (smooth - 127.5) * rng.uniform(0.1, 0.3)
    grain = rng.normal(0, rng.uniform(3, 12), (size, size, 3))
    img = base + ramp + smooth + grain
    return np.clip(img, 0, 255).astype(np.uint8)


def _distractors(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Small ellipses and line segments: clutter that is never one of the class shapes."""
    im = Image.fromarray(img)
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 7))):
        x, y = rng.uniform(0, SIZE, 2)
        rx, ry = rng.uniform(1.5, 6, 2)
        d.ellipse([x - rx, y - ry, x + rx, y + ry], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = rng.uniform(0, SIZE, 2)
        length, a = rng.uniform(8, 30), rng.uniform(0, 2 * np.pi)
        d.line([x0, y0, x0 + length * np.cos(a), y0 + length * np.sin(a)],
               fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
    return np.asarray(im).copy()


def _hsv_to_rgb(h, s, v):
    """h in [0, 1), s and v in [0, 1] -> RGB floats in [0, 255]."""
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb) * 255.0


def _object_colour(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A saturated colour of random hue, saturation and brightness that stands out from the
    background under the mask (the class plays no part in it)."""
    under = img[mask].mean(0) if mask.any() else img.reshape(-1, 3).mean(0)
    best, best_d = None, -1.0
    for _ in range(20):
        c = _hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
        dist = float(np.abs(c - under).sum())
        if dist > 150:
            return c
        if dist > best_d:
            best, best_d = c, dist
    return best


def _paint(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    colour = _object_colour(rng, img, mask)
    shade = rng.normal(0, rng.uniform(2, 8), img.shape)
    obj = np.clip(colour + shade, 0, 255).astype(np.uint8)
    return np.where(mask[..., None], obj, img)


def _pose(rng, rmin, rmax):
    r = rng.uniform(rmin, rmax)
    margin = r + 2
    cx, cy = rng.uniform(margin, SIZE - margin, 2)
    return float(cx), float(cy), float(r), float(rng.uniform(0, 2 * np.pi))


def _rng(seed: int, split: str, index: int, kind: int = 0) -> np.random.Generator:
    """kind 0: the generator of image `index`; kind 1: of the labels of a split (index = offset)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_IDS[split], int(kind), int(index)]))


def draw_one(label: int, seed: int, split: str, index: int):
    """One image (uint8 112x112x3) with an object of class `label`, and its mask (uint8 {0,1})."""
    rng = _rng(seed, split, index)
    img = _distractors(rng, _background(rng))
    mask = shape_mask(label, *_pose(rng, 17, 36))
    return _paint(rng, img, mask), mask.astype(np.uint8)


def draw_two(label_a: int, label_b: int, seed: int, split: str, index: int):
    """Two objects of the given classes, not touching: image, mask_a, mask_b (disjoint)."""
    rng = _rng(seed, split, index)
    img = _distractors(rng, _background(rng))
    for _ in range(200):
        pa, pb = _pose(rng, 13, 24), _pose(rng, 13, 24)
        if np.hypot(pa[0] - pb[0], pa[1] - pb[1]) > pa[2] + pb[2] + 3:
            break
    mask_a, mask_b = shape_mask(label_a, *pa), shape_mask(label_b, *pb)
    mask_a &= ~mask_b
    img = _paint(rng, img, mask_a)
    img = _paint(rng, img, mask_b)
    return img, mask_a.astype(np.uint8), mask_b.astype(np.uint8)


def balanced_labels(n: int, seed: int, split: str) -> np.ndarray:
    """n labels, as balanced over the classes as n allows, in a seeded random order."""
    labels = np.arange(n) % len(CLASSES)
    return _rng(seed, split, 0, kind=1).permutation(labels)


def two_labels(n: int, seed: int) -> np.ndarray:
    """(n, 2) pairs of different classes."""
    rng = _rng(seed, "two", 1, kind=1)
    a = balanced_labels(n, seed, "two")
    b = (a + rng.integers(1, len(CLASSES), n)) % len(CLASSES)
    return np.stack([a, b], 1)


def sample_batch(n: int, seed: int, split: str = "train", start: int = 0):
    """Images (n, 112, 112, 3) uint8, masks (n, 112, 112) uint8 and labels (n,) for training."""
    labels = _rng(seed, split, start, kind=1).integers(0, len(CLASSES), n)
    imgs, masks = [], []
    for k, lab in enumerate(labels):
        im, m = draw_one(int(lab), seed, split, start + k)
        imgs.append(im)
        masks.append(m)
    return np.stack(imgs), np.stack(masks), labels


# ---------------------------------------------------------------- writing a set
def _content_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MARKER:
            h.update(p.relative_to(root).as_posix().encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def generate(out_dir, n_val: int = 300, n_seg: int = 200, n_two: int = 100, seed: int = 0) -> dict:
    """Write the whole set under `out_dir` (see the module doc); returns `paths_in(out_dir)`."""
    from .gtsegs import write_gtsegs

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for name in CLASSES:
        (out / "val" / name).mkdir(parents=True, exist_ok=True)
    for i, lab in enumerate(balanced_labels(n_val, seed, "val")):
        img, _ = draw_one(int(lab), seed, "val", i)
        Image.fromarray(img).save(out / "val" / CLASSES[lab] / f"{i:05d}.png", optimize=False)

    seg_labels = balanced_labels(n_seg, seed, "seg")
    imgs, masks = zip(*(draw_one(int(lab), seed, "seg", i) for i, lab in enumerate(seg_labels))) if n_seg else ((), ())
    write_gtsegs(out / SEG_FILE, list(imgs), list(masks), labels=seg_labels)

    pairs = two_labels(n_two, seed)
    drawn = [draw_two(int(a), int(b), seed, "two", i) for i, (a, b) in enumerate(pairs)]
    write_gtsegs(out / TWO_FILE, [d[0] for d in drawn], [d[1] for d in drawn], labels=pairs[:, 0],
                 masks_b=[d[2] for d in drawn], labels_b=pairs[:, 1])

    marker = {"version": VERSION, "generator": GENERATOR_REV, "seed": seed, "n_val": n_val, "n_seg": n_seg, "n_two": n_two,
              "hash": _content_hash(out)}
    (out / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    return paths_in(out)


def paths_in(root) -> dict:
    root = Path(root)
    return {"val": root / "val", "seg": root / SEG_FILE, "two": root / TWO_FILE, "classes": list(CLASSES),
            "root": root}


# ---------------------------------------------------------------- the shipped default
def cache_root() -> Path:
    """`$TRANSEXPLAIN_CACHE` if set, else ~/.cache/transexplain."""
    env = os.environ.get("TRANSEXPLAIN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "transexplain"


def embedded_data_dir() -> Path:
    """The default set (seed 0, default sizes), generated on first use into the cache.

    Generation goes into a temporary sibling directory that is renamed into place, so a reader
    never sees a half-written set and concurrent first uses cannot corrupt it (the loser of the
    race discards its copy).
    """
    root = cache_root()
    final = root / f"{VERSION}-seed0"
    if _complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{VERSION}-tmp-", dir=root))
    try:
        generate(tmp, seed=0, **DEFAULT_SIZES)
        if final.exists() and not _complete(final):
            # a damaged leftover (e.g. deleted marker): move it aside, then replace it
            stale = Path(tempfile.mkdtemp(prefix=f".{VERSION}-stale-", dir=root))
            try:
                os.replace(final, stale / "old")
            except OSError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final):  # someone else's rename did not win either: surface it
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _complete(path: Path) -> bool:
    try:
        info = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    sizes_ok = all(info.get(k) == v for k, v in DEFAULT_SIZES.items())
    return info.get("version") == VERSION and info.get("generator") == GENERATOR_REV and sizes_ok and (path / SEG_FILE).exists() and (path / TWO_FILE).exists()


def verify(path) -> bool:
    """Recompute the content hash of a generated set and compare it with its marker."""
    path = Path(path)
    try:
        info = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return info.get("hash") == _content_hash(path)


def embedded_paths() -> dict:
    """{'val': image folder, 'seg': gtsegs-format .mat, 'two': two-object .mat, 'classes': names}."""
    return paths_in(embedded_data_dir())
