"""Pictures for people: heatmap overlays per image, and a grid comparing every method."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import UserError


#: file name endings `explain` takes from a folder
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
#: grey-scale PIL modes, converted to RGB (three equal channels) as the benchmarks' readers do
GREY_MODES = ("L", "1", "I", "I;16", "F")


def expand_inputs(paths) -> list:
    """The image files `explain` was given: files as they are, a folder as every image file directly
    in it (sorted by name); the same file given twice is explained once."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(c for c in p.iterdir() if c.is_file() and c.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"The folder {p} holds no image files ({', '.join(IMAGE_SUFFIXES)}): give image files or a folder of them.")
            files += found
        else:
            files.append(p)
    seen, unique = set(), []
    for f in files:
        key = f.resolve() if f.exists() else f
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def output_stems(paths) -> list:
    """One distinct output name per input: the file's stem; inputs whose stems clash (a/img.png and
    b/img.png, or img.png and img.jpg) get their folder's name in front (a_img, b_img), and a
    number after (-2, -3, ...) if that still clashes. So no output of a command overwrites another."""
    from collections import Counter

    paths = [Path(p) for p in paths]
    counts = Counter(p.stem for p in paths)
    used, names = set(), []
    for p in paths:
        name = p.stem if counts[p.stem] == 1 else f"{p.resolve().parent.name or 'root'}_{p.stem}"
        base, k = name, 2
        while name in used:
            name, k = f"{base}-{k}", k + 1
        used.add(name)
        names.append(name)
    return names


def read_rgb_image(path: Path, notes: list | None = None):
    """Open an image file as RGB; grey-scale images are converted (as the benchmarks do; a line is
    added to `notes` when given), images with an alpha channel and unreadable files are refused."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"Image file {path} does not exist: check the path.")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"Cannot read {path} as an image ({err.__class__.__name__}): give a PNG or JPEG file.") from None
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in GREY_MODES:
        if notes is not None:
            notes.append(f"{path} is a grey-scale image ({img.mode}): converted to RGB (three equal channels), as the benchmarks do.")
        return img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        raise UserError(f"{path} has an alpha channel ({img.mode}): the model expects RGB; flatten it onto a background first.")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def preprocess(img, input_size, mean, std, crop: bool = False) -> torch.Tensor:
    """The paper's Resize((H, W)) without crop, or resize + center crop; then normalise."""
    from torchvision.transforms import functional as TF

    _, h, w = input_size
    if crop:
        short = int(round(h / 0.875))
        img = TF.center_crop(TF.resize(img, short), [h, w])
    else:
        img = TF.resize(img, [h, w])
    t = TF.to_tensor(img)
    return TF.normalize(t, list(mean), list(std))


def overlay(image01: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Blend a [0, 1] heatmap (jet colours) onto an RGB image in [0, 1]."""
    from matplotlib import colormaps

    colours = colormaps["jet"](heat)[..., :3]
    return np.clip(0.5 * image01 + 0.5 * colours, 0, 1)


def _to_display(x: torch.Tensor, mean, std) -> np.ndarray:
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return (x.cpu() * s + m).clamp(0, 1).permute(1, 2, 0).numpy()


def _explain_in_chunks(explain, model, batch, method, target, precision, chunk: int = 16, options=None):
    """`explain` over `batch` a few images at a time (a folder can hold many); one result back."""
    from types import SimpleNamespace

    parts = [explain(model, batch[i:i + chunk], method=method, target=target, precision=precision, **(options or {}))
             for i in range(0, len(batch), chunk)]
    if len(parts) == 1:
        return parts[0]
    return SimpleNamespace(**{key: torch.cat([getattr(r, key) for r in parts])
                              for key in ("logits", "target", "heatmap", "token_map")})


def explain_images(paths, model_spec, method, methods, target, out: Path, crop: bool = False, pretrained: bool = False,
                   precision: str = "float64", classes=None, prompt: str = "a photo of a {}", options=None):
    """The work behind `tx-bench explain IMAGE...`; the maps are computed in `precision`; `options`: the
    `--option` pairs (commands.common.method_options)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .api import explain
    from .commands.common import method_options
    from .explainers import get_method, method_names
    from .models.loading import load_model

    paths = expand_inputs(paths)
    notes: list = []
    images = [read_rgb_image(p, notes) for p in paths]  # every input checked before the model loads
    stems = output_stems(paths)
    loaded = load_model(model_spec, pretrained=pretrained, classes=classes, prompt=prompt)
    batch = torch.stack([preprocess(img, loaded.input_size, loaded.mean, loaded.std, crop) for img in images])
    for line in notes:
        print(line)
    names = loaded.class_names
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def label(i):
        return f"{i} ({names[i]})" if names and i < len(names) else str(i)

    if methods:
        chosen = method_names() if methods == "all" else [get_method(m.strip()).name for m in methods.split(",")]
    else:
        chosen = [get_method(method).name]
    per_method = method_options(options, chosen)
    results = {m: _explain_in_chunks(explain, loaded.model, batch, m, target, precision, options=per_method.get(m))
               for m in chosen}
    first = results[chosen[0]]
    for i, p in enumerate(paths):
        pred = int(first.logits[i].argmax())
        print(f"{p}: predicted class {label(pred)}; explained class {label(int(first.target[i]))}")
    if len(chosen) == 1:
        res = first
        for i, p in enumerate(paths):
            stem = stems[i]
            np.save(out / f"{stem}.{chosen[0]}.npy", res.token_map[i].cpu().numpy())
            picture = overlay(_to_display(batch[i], loaded.mean, loaded.std), res.heatmap[i].cpu().float().numpy())
            plt.imsave(out / f"{stem}.{chosen[0]}.png", picture)
            print(f"  {p}: wrote {out / f'{stem}.{chosen[0]}.png'} and the raw map {out / f'{stem}.{chosen[0]}.npy'}")
        return
    cols = len(chosen) + 1
    fig, axes = plt.subplots(len(paths), cols, figsize=(2.2 * cols, 2.4 * len(paths)), squeeze=False)
    for i, p in enumerate(paths):
        image = _to_display(batch[i], loaded.mean, loaded.std)
        axes[i, 0].imshow(image)
        axes[i, 0].set_title(f"{Path(p).name}\npred {label(int(first.logits[i].argmax()))}", fontsize=7)
        for j, m in enumerate(chosen, start=1):
            axes[i, j].imshow(overlay(image, results[m].heatmap[i].cpu().float().numpy()))
            axes[i, j].set_title(m, fontsize=7)
            np.save(out / f"{stems[i]}.{m}.npy", results[m].token_map[i].cpu().numpy())
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    grid = out / "comparison.png"
    fig.savefig(grid, dpi=120)
    plt.close(fig)
    print(f"wrote the comparison grid {grid} and one raw .npy map per image and method in {out}:")
    for p, stem in zip(paths, stems):
        print(f"  {p}: {out / f'{stem}.<method>.npy'}")
