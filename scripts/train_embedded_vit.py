"""Train the embedded ViT on the procedural "shapes" set and save it to transexplain/assets/embedded_vit.

    python scripts/train_embedded_vit.py [--train 16000] [--epochs 13] [--out DIR]

A small timm VisionTransformer (patch 8 on 112x112 images: a 14x14 grid plus the CLS token,
class-token pooling, mean = std = 0.5) whose patch embedding is a convolutional stem (three 3x3
stride-2 convolutions with BatchNorm and ReLU, then a 1x1 convolution: "early convolutions",
Xiao et al. 2021). A plain linear patch embedding did not learn the shapes under random colours
in the 30-minute CPU budget (validation accuracy stayed below 20% after 40k training images in
five settings); the stem did. The training images come from the shapes generator with a
different seed than the shipped validation set, augmented with flips and 90-degree rotations
(which change no class). `--erase P` (default 0.25) blacks out random regions of a share P of
the training images (`_erase.py`) so that the perturbation benchmark's black pixels are not new to
the model: without it (98.0% val) the perturbation test did not separate methods, with P = 0.5
the same 13 epochs reached only 92.7%; P = 0.25 gives 96.0% and is what ships. Deterministic on
CPU: fixed seeds, fixed number of steps. Prints the
accuracy on the shipped validation set after every epoch and keeps the best epoch.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transexplain.data import shapes  # noqa: E402
from transexplain.models.loading import add_conv_stem  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _erase import random_black_regions  # noqa: E402

ARCH = "vit_tiny_patch16_224"
MODEL_KWARGS = {"img_size": 112, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 2.0}
CONV_STEM = [24, 48, 96]
MEAN = STD = (0.5, 0.5, 0.5)
TRAIN_SEED = 1000  # the shipped val/seg sets use seed 0


def _chunk(args):
    n, seed, start = args
    imgs, masks, labels = shapes.sample_batch(n, seed, "train", start=start)
    # per-patch labels (8x8 patches): the object's class where it covers a quarter of the patch, else 10
    cover = masks.reshape(n, 14, 8, 14, 8).mean((2, 4))
    tokens = np.where(cover > 0.25, labels[:, None, None], len(shapes.CLASSES)).astype(np.int64)
    return imgs, labels, tokens


def make_train(n: int, seed: int, workers: int = 2):
    chunk = 500
    jobs = [(min(chunk, n - s), seed, s) for s in range(0, n, chunk)]
    with Pool(workers) as pool:
        parts = pool.map(_chunk, jobs)
    imgs = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    tokens = np.concatenate([p[2] for p in parts])
    return torch.from_numpy(imgs), torch.from_numpy(labels).long(), torch.from_numpy(tokens)


def load_val(val_dir: Path):
    from PIL import Image

    imgs, labels = [], []
    for k, name in enumerate(sorted(p.name for p in val_dir.iterdir() if p.is_dir())):
        for f in sorted((val_dir / name).glob("*.png")):
            imgs.append(np.asarray(Image.open(f).convert("RGB")))
            labels.append(k)
    return torch.from_numpy(np.stack(imgs)), torch.tensor(labels)


def normalise(u8: torch.Tensor) -> torch.Tensor:
    x = u8.permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5


def augment(x: torch.Tensor, tokens: torch.Tensor, g: torch.Generator):
    """Flips and 90-degree rotations (applied to the patch labels too)."""
    b = x.shape[0]
    out, tok = x.clone(), tokens.clone()
    flip = torch.rand(b, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    tok[flip] = tok[flip].flip(-1)
    rot = torch.randint(0, 4, (b,), generator=g)
    for k in range(1, 4):
        sel = rot == k
        if sel.any():
            out[sel] = torch.rot90(out[sel], k, (-2, -1))
            tok[sel] = torch.rot90(tok[sel], k, (-2, -1))
    return out, tok


@torch.no_grad()
def accuracy(model, imgs_u8, labels, bs=100):
    model.eval()
    hits = 0
    for s in range(0, len(labels), bs):
        hits += (model(normalise(imgs_u8[s:s + bs])).argmax(1) == labels[s:s + bs]).sum().item()
    return hits / len(labels)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=16000, help="training images")
    ap.add_argument("--epochs", type=int, default=13)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--token-aux", type=float, default=0.0,
                    help="weight of an auxiliary per-patch label loss (speeds up learning; the head is not saved)")
    ap.add_argument("--erase", type=float, default=0.25,
                    help="share of training images with random regions blacked out (see _erase.py)")
    ap.add_argument("--init", type=Path, default=None, help="start from these weights (model.safetensors)")
    ap.add_argument("--out", type=Path, default=ROOT / "transexplain" / "assets" / "embedded_vit")
    args = ap.parse_args()

    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    val_dir = shapes.embedded_paths()["val"]
    val_x, val_y = load_val(val_dir)
    cache = Path(tempfile.gettempdir()) / f"shapes-train-{shapes.VERSION}-r{shapes.GENERATOR_REV}-{TRAIN_SEED}-{args.train}.npz"
    if cache.exists():  # the training images are deterministic: reuse them between runs
        with np.load(cache) as z:
            train_x, train_y, train_t = (torch.from_numpy(z[k]) for k in ("x", "y", "t"))
    else:
        train_x, train_y, train_t = make_train(args.train, TRAIN_SEED, workers=args.threads)
        np.savez(cache, x=train_x.numpy(), y=train_y.numpy(), t=train_t.numpy())
    print(f"data: {len(train_y)} train, {len(val_y)} val ({time.time() - t0:.0f} s)", flush=True)

    model = add_conv_stem(timm.create_model(ARCH, pretrained=False, num_classes=len(shapes.CLASSES), **MODEL_KWARGS), CONV_STEM)
    if args.init is not None:  # continue from saved weights (e.g. a second, shorter schedule)
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(args.init)))
    # optional auxiliary "token labelling" head (not saved): each patch token predicts its patch's label
    aux = torch.nn.Linear(MODEL_KWARGS["embed_dim"], len(shapes.CLASSES) + 1)
    params = list(model.named_parameters()) + ([("aux." + n, p) for n, p in aux.named_parameters()] if args.token_aux else [])
    decay = [p for n, p in params if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim > 1 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.999))
    steps_per_epoch = len(train_y) // args.batch
    total = steps_per_epoch * args.epochs
    warmup = min(300, total // 10)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    g = torch.Generator().manual_seed(1)
    step, best = 0, -1.0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=g)
        run_loss, run_hits, seen = 0.0, 0, 0
        for s in range(steps_per_epoch):
            idx = order[s * args.batch:(s + 1) * args.batch]
            x, tok = augment(normalise(train_x[idx]), train_t[idx], g)
            x = random_black_regions(x, g, p=args.erase)
            y = train_y[idx]
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            feats = model.forward_features(x)
            logits = model.forward_head(feats)
            loss = F.cross_entropy(logits, y, label_smoothing=0.05)
            if args.token_aux:
                aux_logits = aux(feats[:, model.num_prefix_tokens:])
                loss = loss + args.token_aux * F.cross_entropy(aux_logits.reshape(-1, aux_logits.shape[-1]), tok.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            run_loss += loss.item() * len(y)
            run_hits += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            if s % 50 == 0:
                print(f"epoch {epoch} step {s}/{steps_per_epoch} loss {run_loss / seen:.3f} "
                      f"train acc {run_hits / seen:.3f} lr {lr_at(step):.2e} ({time.time() - t0:.0f} s)", flush=True)
        acc = accuracy(model, val_x, val_y)
        if acc >= best:  # keep the best epoch on the validation set
            best = acc
            save(model, args, acc, time.time() - t0, epoch)
        print(f"epoch {epoch} done: train loss {run_loss / seen:.3f} acc {run_hits / seen:.3f}; val acc {acc:.4f} "
              f"({time.time() - t0:.0f} s)", flush=True)

    print(f"val accuracy (last epoch) {acc:.4f}, best {best:.4f} on {len(val_y)} images; saved to {args.out} ({time.time() - t0:.0f} s)", flush=True)


def save(model, args, acc, seconds, epoch):
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out / "model.safetensors"))
    (args.out / "model.safetensors").chmod(0o644)
    config = {
        "architecture": ARCH, "model_kwargs": MODEL_KWARGS, "conv_stem": CONV_STEM, "num_classes": len(shapes.CLASSES),
        "input_size": [3, 112, 112], "mean": list(MEAN), "std": list(STD), "class_names": list(shapes.CLASSES),
        "data": f"{shapes.VERSION} generator {shapes.GENERATOR_REV} seed 0",
        "train": {"images": args.train, "seed": TRAIN_SEED, "epochs": args.epochs, "batch": args.batch,
                  "lr": args.lr, "init": None if args.init is None else str(args.init), "token_aux": args.token_aux, "erase": args.erase, "threads": args.threads, "saved_after_epoch": epoch + 1},
        "val_accuracy": round(acc, 4), "train_seconds": round(seconds),
    }
    (args.out / "config.json").write_text(json.dumps(config, indent=1) + "\n")

if __name__ == "__main__":
    main()
