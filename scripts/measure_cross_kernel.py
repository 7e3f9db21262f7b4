"""How much do the maps depend on the machine, and how ill-conditioned is each method itself?

On the first `--images` embedded validation images, every method's [0, 1] heatmap is computed in a
fresh process per CPU capability (ATEN_CPU_CAPABILITY=default, avx2, and this machine's own
kernels) and per precision; printed per method is the largest |difference| over all images and
pixels, and in brackets how many images differ by more than 1e-3:
  - "mixed kernels": the default precision across kernels (goal <= 1e-3);
  - "float64 kernels": all-float64 across kernels;
  - "float32 kernels": the fast mode across kernels;
  - "float32 vs float64": the fast mode against the default, same kernels;
  - "float64 noise 1e-7": float64 maps of images with 1e-7 relative Gaussian noise against the
    clean images' maps (the method's own conditioning, independent of any kernel);
and the same for the LRP-based methods with the relative stabiliser (`epsilon="relative"`).

    python scripts/measure_cross_kernel.py [--images 100] [--model embedded]
"""
from __future__ import annotations

import argparse

import numpy as np

import transexplain
from transexplain.evaluation.stability import capability_in_use, kernel_maps

RELATIVE = ("full_lrp", "partial_lrp", "transformer_attribution", "ln_stats")


def spread(maps: list[dict], method: str) -> str:
    """Largest pairwise |difference| of one method's maps, and how many images exceed 1e-3."""
    worst, per_image = 0.0, None
    for i in range(len(maps)):
        for j in range(i + 1, len(maps)):
            d = np.abs(maps[i][method] - maps[j][method]).reshape(len(maps[i][method]), -1).max(1)
            worst = max(worst, float(d.max()))
            per_image = d if per_image is None else np.maximum(per_image, d)
    return f"{worst:9.1e} ({int((per_image > 1e-3).sum()):3d})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--capabilities", nargs="+", default=["default", "avx2", None])
    args = ap.parse_args()
    caps = [None if c in (None, "native", "None") else c for c in args.capabilities]
    methods = list(transexplain.list_methods())
    n = args.images
    runs = {}
    for precision in ("mixed", "float64", "float32"):
        for cap in caps:
            runs[(precision, cap)] = kernel_maps(args.model, n, methods, precision, cap, timeout=3600)
    noisy = kernel_maps(args.model, n, methods, "float64", None, timeout=3600, noise=1e-7)
    used = sorted({str(r["_capability"]) for r in runs.values()})
    print(f"model {args.model}, {n} images, kernels {', '.join(used)} (native: {capability_in_use()})")
    cols = ["mixed kernels", "float64 kernels", "float32 kernels", "float32 vs float64", "mixed vs float64",
            "float64 noise 1e-7"]
    print(f"| method | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for m in methods:
        row = [spread([runs[("mixed", c)] for c in caps], m), spread([runs[("float64", c)] for c in caps], m),
               spread([runs[("float32", c)] for c in caps], m), spread([runs[("float32", None)], runs[("float64", None)]], m),
               spread([runs[("mixed", None)], runs[("float64", None)]], m), spread([runs[("float64", None)], noisy], m)]
        print(f"| {m} | " + " | ".join(row) + " |")
    # the relative stabiliser, same measurements
    from transexplain.evaluation import stability

    print("\nwith epsilon='relative':")
    rel_cols = ["float64 kernels", "float32 kernels", "float32 vs float64", "float64 noise 1e-7"]
    print(f"| method | " + " | ".join(rel_cols) + " | vs absolute (float64) |")
    print("|---|" + "---|" * (len(rel_cols) + 1))
    rel = {}
    for precision in ("float64", "float32"):
        for cap in caps:
            rel[(precision, cap)] = stability.kernel_maps(args.model, n, list(RELATIVE), precision, cap, timeout=3600,
                                                          epsilon="relative")
    rel_noisy = stability.kernel_maps(args.model, n, list(RELATIVE), "float64", None, timeout=3600, noise=1e-7,
                                      epsilon="relative")
    for m in RELATIVE:
        row = [spread([rel[("float64", c)] for c in caps], m), spread([rel[("float32", c)] for c in caps], m),
               spread([rel[("float32", None)], rel[("float64", None)]], m), spread([rel[("float64", None)], rel_noisy], m),
               spread([rel[("float64", None)], runs[("float64", None)]], m)]
        print(f"| {m} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
