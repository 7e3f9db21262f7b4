"""Do the maps on a CUDA GPU equal the CPU's? Every method on the embedded models, side by side.

For each embedded model (ViT, Swin) and each method it can run: the heatmaps of the first N
embedded validation images on the CPU and on the GPU, in float64 (the default) and float32, the
largest difference between them and the time of each. float64 maps should agree to ~1e-9 (the
cross-kernel figures of docs/numerics.md); float32 maps of the ill-conditioned relevance methods
may not, as across CPU kernels.

    python scripts/check_cuda.py [--n 16] [--models embedded embedded-swin] [--methods ...]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch


def maps(model, x, method, precision, device):
    import transexplain

    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = transexplain.explain(model, x.to(device), method, precision=precision).heatmap
    if device == "cuda":
        torch.cuda.synchronize()
    return out.double().cpu(), time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--models", nargs="+", default=["embedded", "embedded-swin"])
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--precisions", nargs="+", default=["float64", "float32"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("No CUDA GPU is available: this script compares CPU and GPU maps.")
    from transexplain.commands.common import resolve_methods
    from transexplain.evaluation.stability import embedded_batch
    from transexplain.models import as_adapter

    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for spec in args.models:
        loaded, x = embedded_batch(spec, args.n)
        cpu_model = loaded.model
        gpu_model = copy.deepcopy(loaded.model).to("cuda")
        methods = args.methods or resolve_methods("all", as_adapter(cpu_model))
        print(f"\n{spec}: {len(x)} images")
        print(f"{'method':26s} {'precision':9s} {'max |cpu-gpu|':>14s} {'cpu s':>8s} {'gpu s':>8s}")
        for method in methods:
            for p in args.precisions:
                try:
                    maps(gpu_model, x[:2], method, p, "cuda")  # warm-up (kernels, the cast copy)
                    a, t_cpu = maps(cpu_model, x, method, p, "cpu")
                    b, t_gpu = maps(gpu_model, x, method, p, "cuda")
                    print(f"{method:26s} {p:9s} {(a - b).abs().max().item():14.3g} {t_cpu:8.2f} {t_gpu:8.3f}", flush=True)
                except Exception as e:  # keep going: one broken method must not hide the others
                    print(f"{method:26s} {p:9s} FAILED: {type(e).__name__}: {str(e)[:160]}", flush=True)


if __name__ == "__main__":
    main()
