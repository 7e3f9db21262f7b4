"""Train the embedded Swin (`load_model("embedded-swin")`) on the procedural shapes data.

A small timm SwinTransformer (two stages, 14x14 then 7x7 tokens, 7x7 windows: stage 1 has four
windows and its second block really shifts them, with the attention mask; stage 2 is one window,
where timm skips the shift). Patch 8 rather than 4 because 28x28 tokens cost ~5x more per step on
the two CPU cores this was trained on. Like the embedded ViT, its patch embedding is a
convolutional stem (three 3x3 stride-2 convolutions with BatchNorm and ReLU, then a 1x1
convolution), which is what lets a model this small learn the shapes under random colours.
`--aux W` adds an auxiliary linear head (not saved) that makes each final-stage token predict its
patch's label (the class, or background); it is off by default, as is `--erase P` (random regions of
a share P of the images blacked out, `_erase.py`). Trained on images drawn by
`transexplain.data.shapes.sample_batch` (split "train", never the val/seg/two splits), checked on
the embedded validation image folder, and written to transexplain/assets/embedded_swin/.

    python scripts/train_embedded_swin.py [--minutes 20] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from transexplain.data import shapes
from transexplain.models.loading import add_conv_stem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _erase import random_black_regions  # noqa: E402

ARCH = "swin_tiny_patch4_window7_224"
MODEL_KWARGS = dict(img_size=112, patch_size=8, window_size=7, embed_dim=48, depths=[2, 2], num_heads=[3, 6],
                    mlp_ratio=2.0, drop_path_rate=0.0)
CONV_STEM = [24, 48, 96]
MEAN = STD = (0.5, 0.5, 0.5)
OUT = Path(__file__).resolve().parent.parent / "transexplain" / "assets" / "embedded_swin"


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load_val():
    from PIL import Image

    paths = shapes.embedded_paths()
    imgs, labels = [], []
    for k, name in enumerate(paths["classes"]):
        for p in sorted((Path(paths["val"]) / name).glob("*.png")):
            imgs.append(np.asarray(Image.open(p).convert("RGB")))
            labels.append(k)
    return to_tensor(np.stack(imgs)), torch.tensor(labels)


def token_labels(masks: np.ndarray, labels: np.ndarray, grid: int = 7) -> torch.Tensor:
    """(n, grid, grid) labels of the final-stage tokens: the image's class where the object covers
    at least a quarter of the token's 16x16 patch, else 10 (background)."""
    n, size = masks.shape[0], masks.shape[1]
    cover = masks.reshape(n, grid, size // grid, grid, size // grid).mean((2, 4))
    return torch.from_numpy(np.where(cover >= 0.25, labels[:, None, None], len(shapes.CLASSES))).long()


def augment(x: torch.Tensor, tok: torch.Tensor):
    """Random horizontal flips and 90-degree rotations, applied to the token labels too."""
    flip = torch.rand(len(x)) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    tok = torch.where(flip.view(-1, 1, 1), tok.flip(-1), tok)
    rot = torch.randint(0, 4, (len(x),))
    x, tok = x.clone(), tok.clone()
    for k in (1, 2, 3):
        sel = rot == k
        if sel.any():
            x[sel] = torch.rot90(x[sel], k, (-2, -1))
            tok[sel] = torch.rot90(tok[sel], k, (-2, -1))
    return x, tok


@torch.no_grad()
def accuracy(model, x, y, bs=100):
    model.eval()
    pred = torch.cat([model(x[i:i + bs]).argmax(-1) for i in range(0, len(x), bs)])
    return (pred == y).float().mean().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=20.0, help="training time budget")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--aux", type=float, default=0.0, help="weight of the per-token auxiliary loss (0: none)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--erase", type=float, default=0.0,
                    help="share of training images with random regions blacked out (see _erase.py; off for the shipped model)")
    ap.add_argument("--chunk", type=int, default=2048, help="fresh training images drawn per chunk")
    ap.add_argument("--target", type=float, default=0.98, help="stop early at this val accuracy")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import timm
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model = add_conv_stem(timm.create_model(ARCH, pretrained=False, num_classes=len(shapes.CLASSES), **MODEL_KWARGS), CONV_STEM)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{ARCH} {MODEL_KWARGS}: {n_params / 1e6:.2f}M parameters", flush=True)
    xv, yv = load_val()
    # auxiliary token-labelling head (not saved): each final-stage token predicts its 16x16 patch's
    # label, the object's class or "background" (index 10)
    aux = torch.nn.Linear(model.num_features, len(shapes.CLASSES) + 1)
    params = list(model.named_parameters()) + ([("aux." + n, p) for n, p in aux.named_parameters()] if args.aux else [])
    decay = [p for n, p in params if p.ndim > 1 and "relative_position" not in n]
    no_decay = [p for n, p in params if not (p.ndim > 1 and "relative_position" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    budget = args.minutes * 60
    t0 = time.time()
    step, chunk_id, best = 0, 0, (-1.0, None)
    warmup = 100
    while time.time() - t0 < budget:
        imgs, masks, labels = shapes.sample_batch(args.chunk, seed=args.seed, split="train", start=chunk_id * args.chunk)
        chunk_id += 1
        x_all, y_all = to_tensor(imgs), torch.from_numpy(labels).long()
        t_all = token_labels(masks, labels)
        # each chunk is used for two passes (with random flips): drawing images costs ~1/3 of a pass
        perm = torch.cat([torch.randperm(len(x_all)) for _ in range(2)])
        model.train()
        for i in range(0, len(perm) - args.batch + 1, args.batch):
            frac = min(1.0, (time.time() - t0) / budget)
            lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * frac))
            for g in opt.param_groups:
                g["lr"] = lr
            idx = perm[i:i + args.batch]
            x, y, tok = x_all[idx], y_all[idx], t_all[idx]
            x, tok = augment(x, tok)
            x = random_black_regions(x, gen, p=args.erase)
            feats = model.forward_features(x)  # (B, 7, 7, C), final norm applied
            loss = F.cross_entropy(model.forward_head(feats), y, label_smoothing=0.05)
            if args.aux:
                loss = loss + args.aux * F.cross_entropy(aux(feats).flatten(0, 2), tok.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0:
                print(f"step {step} chunk {chunk_id} loss {loss.item():.3f} lr {lr:.2e} t {time.time() - t0:.0f}s", flush=True)
            if time.time() - t0 > budget:
                break
        acc = accuracy(model, xv, yv)
        print(f"after chunk {chunk_id}: val acc {acc:.4f} ({time.time() - t0:.0f}s)", flush=True)
        if acc > best[0]:
            best = (acc, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if acc >= args.target and time.time() - t0 > 0.5 * budget:
            break
    acc, state = best
    model.load_state_dict(state)
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.out / "model.safetensors"))
    cfg = {"architecture": ARCH, "model_kwargs": MODEL_KWARGS, "conv_stem": CONV_STEM, "num_classes": len(shapes.CLASSES),
           "input_size": [3, 112, 112], "mean": list(MEAN), "std": list(STD), "class_names": list(shapes.CLASSES),
           "training": {"data": f"{shapes.VERSION} generator {shapes.GENERATOR_REV} split=train seed={args.seed}", "steps": step,
                        "aux": args.aux, "erase": args.erase, "batch": args.batch, "lr": args.lr, "threads": args.threads,
                        "minutes": round((time.time() - t0) / 60, 1), "val_accuracy": round(acc, 4)}}
    (args.out / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    print(f"saved {args.out} val acc {acc:.4f} in {(time.time() - t0) / 60:.1f} min, {step} steps", flush=True)


if __name__ == "__main__":
    main()
