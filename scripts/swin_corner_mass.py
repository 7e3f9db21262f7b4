"""The Swin corner artefact: how much of a heatmap's mass lands in the image corners.

Two shares of the (non-negative) stage-1 token map are reported, each next to the share that a
uniform map would give (the corners' area share):
- `win`: the four corner 7x7 windows;
- `shift`: the four corner shift x shift (3x3) token blocks, the regions that the cyclic roll of
  the shifted blocks packs together into the one masked window at the bottom right.
Each is computed on the raw token map and on the min-max normalised map (what a heatmap shows:
with start_layer 0 the rollout's identity terms add a near-uniform floor to the raw map that
hides where the rest of the mass goes). A value well above the area share is the artefact
reported by arXiv 2311.11378.

    python scripts/swin_corner_mass.py [--swin-t-images 1] [--embedded-images 100]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

import transexplain
import transexplain.explainers.ln_stats  # noqa: F401  (registers ln_stats)
from transexplain.data import shapes
from transexplain.data.gtsegs import GtSegsDataset
from transexplain.explainers.ln_stats import VARIANTS


def corner_share(token_map: torch.Tensor, k: int) -> torch.Tensor:
    t = token_map.clamp(min=0).double()
    c = t[:, :k, :k].sum((1, 2)) + t[:, :k, -k:].sum((1, 2)) + t[:, -k:, :k].sum((1, 2)) + t[:, -k:, -k:].sum((1, 2))
    return c / t.sum((1, 2)).clamp(min=1e-300)


def area_share(grid, k):
    return 4 * k * k / (grid[0] * grid[1])


def measure(model, x, methods, label, window=7, shift=3, batch=10):
    grid = None
    out = []
    for spec in methods:
        t0 = time.time()
        maps = []
        for i in range(0, len(x), batch):
            if spec.startswith("ln_stats:"):
                e = transexplain.explain(model, x[i:i + batch], "ln_stats", variant=spec.split(":", 1)[1])
            elif spec == "rollout":
                e = transexplain.explain(model, x[i:i + batch], "rollout", start_layer=0)
            else:
                e = transexplain.explain(model, x[i:i + batch], spec)
            maps.append(e.token_map)
        tm = torch.cat(maps)
        grid = tuple(tm.shape[1:])
        lo = tm.flatten(1).amin(1).view(-1, 1, 1)
        nm = tm - lo  # min-max normalised up to a per-sample scale, which the share ignores
        out.append((spec, corner_share(tm, window).mean().item(), corner_share(tm, shift).mean().item(),
                    corner_share(nm, window).mean().item(), corner_share(nm, shift).mean().item()))
        print(f"  {label} {spec}: {time.time() - t0:.0f}s", flush=True)
    print(f"\n{label}: stage-1 grid {grid[0]}x{grid[1]}, {len(x)} image(s); uniform map: "
          f"win {100 * area_share(grid, window):.1f}%, shift {100 * area_share(grid, shift):.1f}%\n")
    print("| method | raw: corner 7x7 windows % | raw: corner 3x3 blocks % | normalised: 7x7 windows % | normalised: 3x3 blocks % |")
    print("|---|---|---|---|---|")
    for spec, w, s, nw, ns in out:
        print(f"| {spec} | {100 * w:.1f} | {100 * s:.1f} | {100 * nw:.1f} | {100 * ns:.1f} |")
    print(flush=True)


def seg_images(n, size, mean, std):
    ds = GtSegsDataset(shapes.embedded_paths()["seg"])
    imgs = torch.from_numpy(np.stack([ds[i][0] for i in range(n)])).permute(0, 3, 1, 2).float() / 255.0
    if imgs.shape[-1] != size:
        imgs = F.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False)
    return (imgs - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--swin-t-images", type=int, default=1)
    ap.add_argument("--embedded-images", type=int, default=100)
    ap.add_argument("--methods", nargs="*", default=["transformer_attribution", "ln_stats", "generic_attention", "rollout"])
    ap.add_argument("--all-variants", action="store_true", help="also every ln_stats variant")
    args = ap.parse_args()
    torch.set_num_threads(1)  # faster than 2 on shared, oversubscribed cores
    methods = list(args.methods) + ([f"ln_stats:{v}" for v in VARIANTS] if args.all_variants else [])
    if args.embedded_images:
        from transexplain.models.loading import load_model

        loaded = load_model("embedded-swin")
        x = seg_images(args.embedded_images, loaded.input_size[-1], loaded.mean, loaded.std)
        measure(loaded.model, x, methods, "embedded Swin (trained)")
    if args.swin_t_images:
        import timm

        torch.manual_seed(0)
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=1000).eval()
        x = seg_images(args.swin_t_images, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        measure(model, x, methods, "Swin-T random weights @224", batch=1)


if __name__ == "__main__":
    main()
