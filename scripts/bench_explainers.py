"""Time and peak memory of every explainer as a ratio to a plain timm forward, side by side.

ViT-B/16 shapes (random weights), 224x224, CPU. For each batch size the plain forward and every
method are timed in interleaved rounds (median of `--repeats`), so background load hits them
alike. Peak memory per image is measured in a fresh subprocess per method (peak RSS above the
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


def run_once(model, x, method):
    import transexplain

    if method == "forward":
        with torch.no_grad():
            model(x)
    elif method == "forward+backward":
        out = model(x)
        out.max(-1).values.sum().backward()
        model.zero_grad(set_to_none=True)
    else:
        transexplain.explain(model, x, method)


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def memory_child(name, method, batch):
    """Peak RSS of one call above the RSS before it; the kernel's peak (VmHWM) is reset first."""
    model = build(name)
    x = torch.randn(batch, 3, 224, 224)
    run_once(model, x, method)  # warm-up: one-off allocations are not the method's cost
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = _status_kb("VmRSS")
    run_once(model, x, method)
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_mb_per_image": max(peak - base, 0) / 1024 / batch}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--_memory_child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory_child:
        name, method, batch = args._memory_child
        memory_child(name, method, int(batch))
        return
    from transexplain.explainers import method_names

    methods = args.methods or [m for m in method_names() if m != "random"]
    torch.set_num_threads(torch.get_num_threads())
    model = build(args.model)
    print(f"model {args.model}, CPU threads {torch.get_num_threads()}, torch {torch.__version__}")
    for batch in args.batches:
        x = torch.randn(batch, 3, 224, 224)
        entries = ["forward"] + methods
        for m in entries:  # warm-up
            run_once(model, x, m)
        times = {m: [] for m in entries}
        for _ in range(args.repeats):
            for m in entries:
                t0 = time.perf_counter()
                run_once(model, x, m)
                times[m].append(time.perf_counter() - t0)
        fwd = statistics.median(times["forward"])
        print(f"\nbatch {batch}: plain forward {fwd * 1000:.0f} ms ({fwd / batch * 1000:.0f} ms/image)")
        print(f"{'method':26s} {'time ms':>9s} {'x forward':>10s} {'target':>7s}")
        for m in methods:
            t = statistics.median(times[m])
            target = TARGETS.get(m)
            flag = "" if target is None else ("ok" if t / fwd <= target else "OVER")
            print(f"{m:26s} {t * 1000:9.0f} {t / fwd:10.2f} {('<=' + str(target)) if target else '':>7s} {flag}")
    if args.no_memory:
        return
    batch = max(args.batches)
    print(f"\npeak memory per image above the loaded model (batch {batch}, fresh process each):")
    for m in ["forward", "forward+backward"] + methods:
        out = subprocess.run([sys.executable, __file__, "--_memory_child", args.model, m, str(batch)],
                             capture_output=True, text=True, check=True)
        mb = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb_per_image"]
        print(f"{m:26s} {mb:8.1f} MB/image")


if __name__ == "__main__":
    main()
