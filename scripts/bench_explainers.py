"""Time and peak memory of every explainer as a ratio to a plain timm forward, side by side.

ViT-B/16 shapes (random weights), 224x224, CPU. For each batch size the plain (float32) forward and
every method in each precision (`float32`, the fast mode; `mixed`, the default that gives the same
maps on every CPU; `float64`, all float64) are timed in interleaved rounds (median of `--repeats`),
so background load hits them alike. Printed per method: each precision's time as a ratio to the
plain forward, the float32 target, and each other precision's time / float32's (target for the
default, mixed: <= 2). Peak memory per image is measured in a fresh subprocess per method (peak RSS above the
RSS after loading the model), next to that of a plain forward+backward.

    python scripts/bench_explainers.py [--model vit_base_patch16_224] [--batches 1 8] [--repeats 3]
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
           "rollout": 1.3, "raw_attention": 1.3}


def build(name):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


PRECISIONS = ("float32", "mixed", "float64")


def run_once(model, x, method, precision="float32"):
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
    x = torch.randn(batch, 3, 224, 224)
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
    ap.add_argument("--_memory_child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory_child:
        name, method, batch, precision = args._memory_child
        memory_child(name, method, int(batch), precision)
        return
    from transexplain.explainers import method_names

    methods = args.methods or [m for m in method_names() if m != "random"]
    torch.set_num_threads(torch.get_num_threads())
    model = build(args.model)
    print(f"model {args.model}, CPU threads {torch.get_num_threads()}, torch {torch.__version__}")
    for batch in args.batches:
        x = torch.randn(batch, 3, 224, 224)
        entries = [("forward", "float32")] + [(m, p) for m in methods for p in args.precisions]
        for m, p in entries:  # warm-up (also builds the cached float64 copy of the model)
            run_once(model, x, m, p)
        times = {e: [] for e in entries}
        for _ in range(args.repeats):
            for m, p in entries:
                t0 = time.perf_counter()
                run_once(model, x, m, p)
                times[(m, p)].append(time.perf_counter() - t0)
        fwd = statistics.median(times[("forward", "float32")])
        print(f"\nbatch {batch}: plain float32 forward {fwd * 1000:.0f} ms ({fwd / batch * 1000:.0f} ms/image)")
        head = "".join(f" {p + ' x fwd':>14s}" for p in args.precisions)
        rel_head = "".join(f" {p + '/f32':>12s}" for p in args.precisions if p != "float32")
        print(f"{'method':26s}{head} {'f32 target':>12s}{rel_head}")
        for m in methods:
            ratios = {p: statistics.median(times[(m, p)]) / fwd for p in args.precisions}
            target = TARGETS.get(m)
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
    print(f"\npeak memory per image above the loaded model (batch {batch}, fresh process each):")
    for m in ["forward", "forward+backward"] + methods:
        for p in (["float32"] if m.startswith("forward") else args.precisions):
            out = subprocess.run([sys.executable, __file__, "--_memory_child", args.model, m, str(batch), p],
                                 capture_output=True, text=True, check=True)
            mb = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb_per_image"]
            print(f"{m:26s} {p:8s} {mb:8.1f} MB/image")


if __name__ == "__main__":
    main()
