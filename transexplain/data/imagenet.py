"""ImageNet-style image readers for the perturbation benchmark, with the model's preprocessing.

Two layouts: a folder with one sub-folder per class (class index = position of the folder name in
the sorted list, e.g. synset ids in the standard order, or in the model's class names when the
folder names are exactly those), or a flat folder plus a labels file of `filename label` lines
(the usual `val.txt` of ImageNet validation). An image that cannot be decoded is skipped and
counted by the caller; it never stops a run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


@dataclass
class Preprocess:
    """Image -> normalised (3, H, W) float tensor.

    Default (the paper): `Resize((H, W))`, bilinear, no crop. `crop=True`: resize the shorter side
    to `int(H * 256 / 224)` then center-crop H x W (the usual timm evaluation transform).
    """

    size: tuple  # (H, W)
    mean: tuple
    std: tuple
    crop: bool = False

    def pil_to_array(self, img) -> np.ndarray:
        from PIL import Image

        img = img.convert("RGB")
        h, w = self.size
        if not self.crop:
            img = img.resize((w, h), Image.BILINEAR)
        else:
            short = int(min(h, w) * 256 / 224)
            iw, ih = img.size
            scale = short / min(iw, ih)
            nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - w) // 2, (nh - h) // 2
            img = img.crop((left, top, left + w, top + h))
        return np.asarray(img, dtype=np.uint8)

    def normalise(self, array: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 (or a batch (B, H, W, 3)) -> normalised float tensor (.., 3, H, W)."""
        t = torch.from_numpy(np.array(array, dtype=np.uint8, copy=True)).float().div_(255.0)
        t = t.movedim(-1, -3)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (t - mean) / std

    def __call__(self, img) -> torch.Tensor:
        return self.normalise(self.pil_to_array(img))

    @property
    def fill(self) -> torch.Tensor:
        """The normalised value of a black pixel (0 in [0, 1] space), per channel: (3, 1, 1)."""
        return (-torch.tensor(self.mean, dtype=torch.float32) / torch.tensor(self.std, dtype=torch.float32)).view(3, 1, 1)


class ImageFolderDataset:
    """Labelled images from a class-folder tree or a flat folder + labels file.

    `items` is a list of (path, label). For a class-folder tree the order interleaves classes
    (first image of every class, then the second, ...) so that `--limit N` takes a class-balanced
    prefix; for a labels file the file's order is kept.
    `load(i)` returns the preprocessed tensor or None when the file cannot be decoded.
    """

    def __init__(self, root, preprocess: Preprocess, labels_file=None, num_classes: int | None = None,
                 class_names: list | None = None):
        self.root = Path(root)
        self.preprocess = preprocess
        #: indices of the images read so far that were not RGB (grey-scale, palette, RGBA): converted
        self.converted: set = set()
        if not self.root.exists():
            raise UserError(f"The data path {self.root} does not exist: give an image folder with one sub-folder per class (or a flat folder with --labels).")
        if not self.root.is_dir():
            raise UserError(f"The data path {self.root} is not a folder: give an image folder with one sub-folder per class (or a flat folder with --labels).")
        if labels_file is not None:
            self.items, self.classes = self._from_labels_file(Path(labels_file))
        else:
            self.items, self.classes = self._from_class_folders(class_names)
        if not self.items:
            raise UserError(f"No images found under {self.root}: expected <class>/<image> files (png, jpg, ...) or a flat folder with --labels.")
        if num_classes is not None:
            top = max(label for _, label in self.items)
            if labels_file is None and len(self.classes) != num_classes:
                raise UserError(
                    f"{self.root} has {len(self.classes)} class folders but the model has {num_classes} classes: give data with one folder per model class, or a matching model."
                )
            if top >= num_classes:
                raise UserError(f"The labels go up to {top} but the model has only {num_classes} classes: use the labels file that matches this model.")

    def _from_class_folders(self, class_names):
        folders = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            loose = [p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
            if loose:
                raise UserError(f"{self.root} holds images but no class sub-folders: give a labels file with --labels (lines `filename label`).")
            return [], []
        names = [p.name for p in folders]
        if class_names and sorted(names) == sorted(class_names):
            index = {name: class_names.index(name) for name in names}  # the model's own order
        else:
            index = {name: i for i, name in enumerate(names)}
        per_class = []
        for folder in folders:
            files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            per_class.append([(p, index[folder.name]) for p in files])
        items = []
        for rank in range(max((len(f) for f in per_class), default=0)):
            items.extend(files[rank] for files in per_class if rank < len(files))
        return items, names

    def _from_labels_file(self, labels_file: Path):
        if not labels_file.is_file():
            raise UserError(f"The labels file {labels_file} does not exist: give a text file of `filename label` lines.")
        items = []
        for lineno, line in enumerate(labels_file.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise UserError(f"Line {lineno} of {labels_file} is not `filename label` with an integer label: fix that line.")
            items.append((self.root / parts[0], int(parts[1])))
        labels = sorted({label for _, label in items})
        return items, [str(label) for label in labels]

    def __len__(self) -> int:
        return len(self.items)

    def label(self, i: int) -> int:
        return self.items[i][1]

    def name(self, i: int) -> str:
        path = self.items[i][0]
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def load(self, i: int):
        """The preprocessed image i, or None when it cannot be read or decoded."""
        from PIL import Image

        try:
            with Image.open(self.items[i][0]) as img:
                if img.mode != "RGB":
                    self.converted.add(i)  # converted to RGB by the preprocessing, as `explain` does
                return self.preprocess(img)
        except (OSError, ValueError, SyntaxError):  # PIL's decode errors (UnidentifiedImageError is an OSError)
            return None


# ---------------------------------------------------------------------------------------- synthetic
#: (width, height) of the synthetic images: the commonest sizes of ImageNet validation photos
IMAGENET_SIZES = ((500, 375), (500, 333), (375, 500), (500, 500), (333, 500), (500, 400), (640, 480))
#: the file that marks a folder as written by `write_imagenet_like` (so that it may be replaced)
IMAGENET_LIKE_MARKER = ".transexplain-imagenet-like"


def imagenet_like_image(k: int, seed: int = 0) -> "np.ndarray":
    """The k-th synthetic photo: smooth colour fields, a few shapes and sensor-like noise, so that its
    JPEG has the size (~50-150 kB) and decoding cost of a real one."""
    rng = np.random.default_rng([seed, k])
    w, h = IMAGENET_SIZES[int(rng.integers(len(IMAGENET_SIZES)))]
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    from PIL import Image, ImageDraw

    img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    array = np.asarray(img, dtype=np.int16) + rng.normal(0, 10, (h, w, 3)).astype(np.int16)
    return np.clip(array, 0, 255).astype(np.uint8)


def _write_imagenet_like_chunk(args):
    from PIL import Image

    root, ks, classes, seed = args
    sizes = 0
    for k in ks:
        path = Path(root) / f"n{k % classes:08d}" / f"ILSVRC2012_val_{k + 1:08d}.JPEG"
        Image.fromarray(imagenet_like_image(k, seed)).save(path, quality=90)
        sizes += path.stat().st_size
    return len(ks), sizes


def write_imagenet_like(root, n: int, seed: int = 0, classes: int = 1000, workers: int = 1, progress=None) -> int:
    """Write `n` synthetic JPEGs into `root`/<class>/ (`classes` folders `n00000000`..., image k in
    class k % classes), the layout `ImageFolderDataset` reads. Returns the bytes written.
    The same (n, seed) gives the same pictures; `workers` processes share the writing."""
    root = Path(root)
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    chunks = [(str(root), range(i, min(n, i + 64)), classes, seed) for i in range(0, n, 64)]
    total = 0
    if workers > 1 and len(chunks) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for done, size in pool.imap(_write_imagenet_like_chunk, chunks):
                total += size
                if progress:
                    progress(done)
    else:
        for chunk in chunks:
            done, size = _write_imagenet_like_chunk(chunk)
            total += size
            if progress:
                progress(done)
    (root / IMAGENET_LIKE_MARKER).write_text(f"n={n} seed={seed} classes={classes}\n")
    return total
