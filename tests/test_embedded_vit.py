"""The shipped embedded ViT: loads, classifies the shipped validation set, and its TA maps sit on the objects."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import transexplain
from transexplain.data import shapes
from transexplain.data.gtsegs import GtSegsDataset
from transexplain.models.loading import EMBEDDED, load_model

ASSET = EMBEDDED["embedded"]
pytestmark = pytest.mark.skipif(not (ASSET / "model.safetensors").exists(),
                                reason="the embedded ViT is not built (scripts/train_embedded_vit.py)")


@pytest.fixture(scope="module")
def loaded():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_model("embedded")


def _normalise(u8, loaded):
    x = torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    return (x - mean) / std


def test_asset_files():
    cfg = json.loads((ASSET / "config.json").read_text())
    assert cfg["architecture"] == "vit_tiny_patch16_224"
    assert cfg["model_kwargs"]["img_size"] == 112 and cfg["model_kwargs"]["patch_size"] == 8
    assert cfg["input_size"] == [3, 112, 112] and cfg["mean"] == cfg["std"] == [0.5] * 3
    assert cfg["class_names"] == shapes.CLASSES and cfg["num_classes"] == 10
    assert (ASSET / "model.safetensors").stat().st_size < 10 * 2**20


def test_structure(loaded):
    m = loaded.model
    assert type(m).__name__ == "VisionTransformer"
    # the patch embedding is a conv stem of total stride 8 (see scripts/train_embedded_vit.py)
    assert isinstance(m.patch_embed.proj, torch.nn.Sequential)
    assert m.patch_embed.grid_size == (14, 14) and m.global_pool == "token" and m.cls_token is not None
    assert loaded.input_size == (3, 112, 112) and loaded.class_names == shapes.CLASSES


def test_val_accuracy(loaded):
    from PIL import Image

    val = Path(shapes.embedded_paths()["val"])
    classes = sorted(p.name for p in val.iterdir() if p.is_dir())
    assert classes == loaded.class_names
    imgs, labels = [], []
    for k, name in enumerate(classes):
        for f in sorted((val / name).glob("*.png")):
            imgs.append(np.asarray(Image.open(f).convert("RGB")))
            labels.append(k)
    x, y = _normalise(np.stack(imgs), loaded), torch.tensor(labels)
    with torch.no_grad():
        pred = torch.cat([loaded.model(x[s:s + 100]).argmax(1) for s in range(0, len(y), 100)])
    acc = (pred == y).float().mean().item()
    assert len(y) == 300 and acc >= 0.95, acc


def _inside_outside(loaded, method, n=40):
    ds = GtSegsDataset(shapes.embedded_paths()["seg"])
    imgs, masks = zip(*(ds[i][:2] for i in range(n)))
    x = _normalise(np.stack(imgs), loaded)
    masks = torch.from_numpy(np.stack(masks)).bool()
    heat = torch.cat([transexplain.explain(loaded.model, x[s:s + 20], method=method).heatmap
                      for s in range(0, n, 20)]).float()
    assert heat.shape == masks.shape and heat.min() >= 0 and heat.max() <= 1
    inside = (heat * masks).sum((1, 2)) / masks.sum((1, 2))
    outside = (heat * ~masks).sum((1, 2)) / (~masks).sum((1, 2))
    return (inside.mean() / outside.mean()).item()


def test_transformer_attribution_sits_on_the_object(loaded):
    ta = _inside_outside(loaded, "transformer_attribution")
    rnd = _inside_outside(loaded, "random")
    print(f"inside/outside ratio: transformer_attribution {ta:.2f}, random {rnd:.2f}")
    assert 0.8 < rnd < 1.25, rnd
    # measured on the shipped model: TA about 11, random about 1.0
    assert ta > 3.0 and ta > rnd + 2.0, (ta, rnd)


def _recolour(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Repaint the object in a hue at least a quarter of the wheel away from its own, keeping its
    saturation, value and shading, among the hues that stand out from the background around it
    (the generator's own rule: L1 distance > 150), picked at random."""
    import colorsys

    inside = mask.astype(bool)
    grown = torch.nn.functional.max_pool2d(torch.from_numpy(inside).float()[None, None], 9, stride=1, padding=4)
    ring = grown[0, 0].numpy().astype(bool) & ~inside
    around = img[ring].reshape(-1, 3).mean(0)
    mean = img[inside].reshape(-1, 3).mean(0) / 255.0
    h, sat, val = colorsys.rgb_to_hsv(*mean)
    options = []
    for turn in np.arange(6, 19) / 24:
        new = np.array(colorsys.hsv_to_rgb((h + turn) % 1.0, sat, val)) * 255.0
        options.append((float(np.abs(new - around).sum()), new))
    good = [new for dist, new in options if dist > 150] or [max(options, key=lambda o: o[0])[1]]
    new = good[int(rng.integers(len(good)))]
    out = img.copy()
    out[inside] = np.clip(img[inside].astype(float) - mean * 255.0 + new, 0, 255).astype(np.uint8)
    return out


def test_the_model_decides_by_shape_not_colour(loaded):
    """Repainting each object in another hue (a quarter to three quarters of the wheel away) keeps
    it classified: the class is in the shape."""
    ds = GtSegsDataset(shapes.embedded_paths()["seg"])
    n = 100
    imgs, masks, labels = zip(*(ds[i] for i in range(n)))
    y = torch.tensor(labels)
    rng = np.random.default_rng(0)
    accs = []
    for repaint in (False, True, True):
        batch = [_recolour(img, mask, rng) if repaint else img for img, mask in zip(imgs, masks)]
        with torch.no_grad():
            pred = loaded.model(_normalise(np.stack(batch), loaded)).argmax(1)
        accs.append((pred == y).float().mean().item())
    print("accuracy: original colours, then two random repaints:", accs)
    assert min(accs) >= 0.9, accs
