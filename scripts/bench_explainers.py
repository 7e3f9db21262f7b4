"""Time and peak memory of every explainer as a ratio to a plain timm forward, side by side.

ViT-B/16 shapes (random weights), 224x224, on the CPU (or `--device cuda`). For each batch size the plain (float32) forward and
every method in each precision (`float32`, the fast mode; `mixed`, the default that gives the same
maps on every CPU; `float64`, all float64) are timed in interleaved rounds (median of `--repeats`),
so background load hits them alike. Printed per method: each precision's time as a ratio to the
plain forward, the float32 target, and each other precision's time / float32's (target for the
default, mixed: <= 2). Peak memory per image is measured in a fresh subprocess per method (peak RSS above the
RSS after loading the model), next to that of a plain forward+backward.

    python scripts/bench_explainers.py [--model vit_base_patch16_224] [--batches 1 8] [--repeats 3] [--device cuda]

`--model` takes a timm name or another family's `--model` form (torchvision:vit_b_16, hf:FOLDER):
the per-family ratios of issue 16 come from running it once per family.

Targets are in units of a plain forward, except those of the methods that are many gradients
(integrated gradients, SmoothGrad: `TARGETS_FWD_BWD`), which are in units of one forward+backward,
timed in the same rounds. On CUDA the peak memory is torch's peak allocation of one call.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

TARGETS = {"transformer_attribution": 6.5, "partial_lrp": 6.5, "generic_attention": 3.5, "gradcam": 3.5,
           "rollout": 1.3, "raw_attention": 1.3, "attnlrp": 3.0, "cp_lrp": 3.0}
#: targets in forward+backward units: 20 steps / 20 noisy copies, each one gradient
TARGETS_FWD_BWD = {"integrated_gradients": 20, "smoothgrad": 20}


def input_shape(model) -> tuple:
    from transexplain.models import as_adapter

    return tuple(as_adapter(model).input_size)


def build(name):
    """A timm name, or any `--model` form with a family prefix (torchvision:vit_b_16, hf:FOLDER),
    with seeded random weights."""
    if ":" in name:
        from transexplain.models.loading import load_model

        return load_model(name, random_weights=True).model.eval()
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


PRECISIONS = ("float32", "mixed", "float64")


def run_once(model, x, method, precision="float32"):
    import transexplain

    if x.is_cuda:
        torch.cuda.synchronize()
    _run(model, x, method, precision)
    if x.is_cuda:
        torch.cuda.synchronize()


def _run(model, x, method, precision):
    import transexplain

    if method == "forward":
        with torch.no_grad():
            model(x)
    elif method == "forward+backward":
        out = model(x)
        out.max(-1).values.sum().backward()
        model.zero_grad(set_to_none=True)
    else:
        transexplain.explain(model, x, method, precision=precision)


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(name, method, batch, precision):
    """Peak RSS of one call above the RSS before it; the kernel's peak (VmHWM) is reset first."""
    model = build(name)
    x = torch.randn(batch, *input_shape(model))
    run_once(model, x, method, precision)  # warm-up: one-off allocations (and the float64 copy) are not the method's cost
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_kb("VmRSS")
    run_once(model, x, method, precision)
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_mb_per_image": max(peak - base, 0) / 1024 / batch}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--_memory_child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory_child:
        name, method, batch, precision = args._memory_child
        memory_child(name, method, int(batch), precision)
        return
    from transexplain.explainers import method_names

    methods = args.methods or [m for m in method_names() if m != "random"]
    torch.set_num_threads(torch.get_num_threads())
    model = build(args.model).to(args.device)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU threads {torch.get_num_threads()}"
    print(f"model {args.model}, {where}, torch {torch.__version__}")
    for batch in args.batches:
        x = torch.randn(batch, *input_shape(model), device=args.device)
        entries = [("forward", "float32"), ("forward+backward", "float32")] + [(m, p) for m in methods for p in args.precisions]
        for m, p in entries:  # warm-up (also builds the cached float64 copy of the model)
            run_once(model, x, m, p)
        times = {e: [] for e in entries}
        for _ in range(args.repeats):
            for m, p in entries:
                t0 = time.perf_counter()
                run_once(model, x, m, p)
                times[(m, p)].append(time.perf_counter() - t0)
        fwd = statistics.median(times[("forward", "float32")])
        fwd_bwd = statistics.median(times[("forward+backward", "float32")]) / fwd
        print(f"\nbatch {batch}: plain float32 forward {fwd * 1000:.0f} ms ({fwd / batch * 1000:.0f} ms/image); "
              f"forward+backward {fwd_bwd:.2f} x fwd")
        head = "".join(f" {p + ' x fwd':>14s}" for p in args.precisions)
        rel_head = "".join(f" {p + '/f32':>12s}" for p in args.precisions if p != "float32")
        print(f"{'method':26s}{head} {'f32 target':>12s}{rel_head}")
        for m in methods:
            ratios = {p: statistics.median(times[(m, p)]) / fwd for p in args.precisions}
            target = TARGETS.get(m)
            if m in TARGETS_FWD_BWD:
                target = round(TARGETS_FWD_BWD[m] * fwd_bwd, 1)
            line = f"{m:26s}" + "".join(f" {ratios[p]:14.2f}" for p in args.precisions)
            if "float32" in ratios:
                flag = "" if target is None else ("ok" if ratios["float32"] <= target else "OVER")
                line += f" {('<=' + str(target)) if target else '':>7s} {flag:4s}"
                for p in args.precisions:
                    if p != "float32":
                        rel = ratios[p] / ratios["float32"]
                        line += f" {rel:7.2f}" + (f" {'ok' if rel <= 2 else 'OVER':4s}" if p == "mixed" else "     ")
            print(line)
    if args.no_memory:
        return
    batch = max(args.batches)
    if args.device.startswith("cuda"):
        x = torch.randn(batch, *input_shape(model), device=args.device)
        print(f"\npeak CUDA memory per image of one call (batch {batch}):")
        for m in ["forward", "forward+backward"] + methods:
            for p in (["float32"] if m.startswith("forward") else args.precisions):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                run_once(model, x, m, p)
                mb = (torch.cuda.max_memory_allocated() - base) / 2**20 / batch
                print(f"{m:26s} {p:8s} {mb:8.1f} MB/image")
        return
    print(f"\npeak memory per image above the loaded model (batch {batch}, fresh process each):")
    for m in ["forward", "forward+backward"] + methods:
        for p in (["float32"] if m.startswith("forward") else args.precisions):
            out = subprocess.run([sys.executable, __file__, "--_memory_child", args.model, m, str(batch), p],
                                 capture_output=True, text=True, check=True)
            mb = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb_per_image"]
            print(f"{m:26s} {p:8s} {mb:8.1f} MB/image")


if __name__ == "__main__":
    main()
