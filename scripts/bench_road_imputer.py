"""ROAD's noisy linear imputation: our batched torch solve against a per-image SciPy sparse solve.

Same images, same removal masks (MoRF and LeRF at ROAD's nine fractions, of smooth random maps),
noise 0 so that both must give the same imputed images; prints each solver's time, the speed-up
over SciPy, and the largest absolute difference between the imputed images.

    python scripts/bench_road_imputer.py [--size 224] [--images 4] [--device cuda] [--methods block,mg,mg:w1,cg]
        [--dtype float64|float32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from transexplain.evaluation.metrics import curves, road


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--methods", default="block")
    ap.add_argument("--repeats", type=int, default=3, help="torch solvers: the median of this many timed runs")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    s, b = args.size, args.images
    x = torch.randn(b, 3, s, s, generator=g, dtype=torch.float64)
    maps = curves.gaussian_blur(torch.rand(b, 1, s, s, generator=g, dtype=torch.float64), 31, s / 28)[:, 0]
    masks = torch.cat([road.road_masks(maps, road.FRACTIONS, most) for most in (True, False)], 1)  # (B, 18, s, s)
    f = masks.shape[1]
    xs = x.unsqueeze(1).expand(b, f, 3, s, s).reshape(b * f, 3, s, s)
    ms = masks.reshape(b * f, s, s)
    n = b * f
    print(f"{n} imputations ({b} images x MoRF/LeRF x 9 fractions) of 3 x {s} x {s}; "
          f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} CPU threads")
    t0 = time.perf_counter()
    ref = np.stack([road.scipy_impute(xs[i].numpy(), ms[i].numpy()) for i in range(n)])
    t_scipy = time.perf_counter() - t0
    print(f"scipy (per image, sparse LU, CPU): {t_scipy:8.3f} s  ({1000 * t_scipy / n:.1f} ms per imputation)")
    dtype = getattr(torch, args.dtype)
    xd, md = xs.to(args.device, dtype), ms.to(args.device)
    w_levels = road._Multigrid.W_LEVELS
    for spec in args.methods.split(","):
        # "mg:w1": the multigrid solver with a W-cycle on its 1 finest level only (default: _Multigrid.W_LEVELS)
        method, _, option = spec.partition(":")
        road._Multigrid.W_LEVELS = int(option[1:]) if option.startswith("w") else w_levels
        road.noisy_linear_impute(xd[:2], md[:2], noise=0.0, method=method)  # warm-up
        times = []
        for _ in range(args.repeats):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = road.noisy_linear_impute(xd, md, noise=0.0, method=method)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t = sorted(times)[len(times) // 2]
        diff = np.abs(out.double().cpu().numpy() - ref).max()
        print(f"torch {spec:5s} ({args.dtype}, {args.device}, batched): {t:8.3f} s  speed-up x{t_scipy / t:.1f}  "
              f"max |difference| {diff:.2e}")


if __name__ == "__main__":
    main()
