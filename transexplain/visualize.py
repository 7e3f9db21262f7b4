"""Pictures for people: heatmap overlays per image, and a grid comparing every method."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import UserError


def read_rgb_image(path: Path):
    """Open an image file as RGB; grey-scale, RGBA and unreadable files are refused clearly."""
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
    if img.mode in ("L", "LA", "1", "I", "I;16", "F"):
        raise UserError(f"{path} is a grey-scale image ({img.mode}): the model expects RGB; convert it to RGB first.")
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


def explain_images(paths, model_spec, method, methods, target, out: Path, crop: bool = False, pretrained: bool = False,
                   precision: str = "float64"):
    """The work behind `tx-bench explain IMAGE...`; the maps are computed in `precision`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .api import explain
    from .explainers import get_method, method_names
    from .models.loading import load_model

    loaded = load_model(model_spec, pretrained=pretrained)
    batch = torch.stack([preprocess(read_rgb_image(p), loaded.input_size, loaded.mean, loaded.std, crop) for p in paths])
    names = loaded.class_names
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def label(i):
        return f"{i} ({names[i]})" if names and i < len(names) else str(i)

    if methods:
        chosen = method_names() if methods == "all" else [get_method(m.strip()).name for m in methods.split(",")]
    else:
        chosen = [get_method(method).name]
    results = {m: explain(loaded.model, batch, method=m, target=target, precision=precision) for m in chosen}
    first = results[chosen[0]]
    for i, p in enumerate(paths):
        pred = int(first.logits[i].argmax())
        print(f"{p}: predicted class {label(pred)}; explained class {label(int(first.target[i]))}")
    if len(chosen) == 1:
        res = first
        for i, p in enumerate(paths):
            stem = Path(p).stem
            np.save(out / f"{stem}.{chosen[0]}.npy", res.token_map[i].cpu().numpy())
            picture = overlay(_to_display(batch[i], loaded.mean, loaded.std), res.heatmap[i].cpu().float().numpy())
            plt.imsave(out / f"{stem}.{chosen[0]}.png", picture)
            print(f"  wrote {out / f'{stem}.{chosen[0]}.png'} and the raw map {out / f'{stem}.{chosen[0]}.npy'}")
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
            np.save(out / f"{Path(p).stem}.{m}.npy", results[m].token_map[i].cpu().numpy())
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    grid = out / "comparison.png"
    fig.savefig(grid, dpi=120)
    plt.close(fig)
    print(f"wrote the comparison grid {grid} and one raw .npy map per image and method in {out}")
