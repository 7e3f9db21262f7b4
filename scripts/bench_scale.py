"""Throughput of the image benchmarks at scale: images/s per method, load / explain split, processes.

Writes a synthetic ImageNet-shaped folder (`tx-bench data make --imagenet-like`) and a gtsegs-format
file made of the same photos, then runs the perturbation test (both tests, predicted class) and
segmentation per method and precision: in this process with 0 and the default number of decoding
workers, and under torchrun with several processes (CPU: the cores shared out; CUDA: one process
per GPU). Prints images/s, the share of the wall time spent waiting for data, the cores used and
the projected time for ImageNet's 50,000 validation images.

    .venv/bin/python scripts/bench_scale.py --quick                 # CPU: ~3 min on 2 cores
    .venv/bin/python scripts/bench_scale.py --quick --device cuda   # one GPU: ~3 min on an H100
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
IMAGENET_VAL = 50_000


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--quick", action="store_true", help="a short run that prints every figure (minutes)")
    ap.add_argument("--model", default=None, help="timm architecture, random weights (default: vit_base_patch16_224 "
                                                  "on CUDA, vit_tiny_patch16_224 on the CPU)")
    ap.add_argument("--methods", default=None, help="comma list (default: transformer_attribution,rollout; "
                                                    "transformer_attribution with --quick)")
    ap.add_argument("--precisions", default=None, help="comma list (default: float64 on the CPU; float64,float32,"
                                                       "bfloat16 on CUDA)")
    ap.add_argument("--images", type=int, default=None, help="images per measurement")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--processes", default=None, help="comma list of process counts (default: 1 and 3 on the CPU, "
                                                      "1 and the number of GPUs on CUDA)")
    ap.add_argument("--data", type=Path, default=None, help="an image folder to use instead of synthetic photos")
    ap.add_argument("--segmentation", default="yes", choices=("yes", "no"))
    # internal: one rank of a torchrun measurement
    ap.add_argument("--as-rank", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.model = args.model or ("vit_base_patch16_224" if cuda else "vit_tiny_patch16_224")
    args.precisions = args.precisions or ("float64,float32,bfloat16" if cuda else "float64")
    args.methods = args.methods or ("transformer_attribution" if args.quick else "transformer_attribution,rollout")
    args.images = args.images or ((384 if cuda else 12) if args.quick else (2048 if cuda else 48))
    args.batch_size = args.batch_size or (64 if cuda else 4)
    if args.processes is None:
        import torch

        gpus = torch.cuda.device_count() if cuda else 0
        args.processes = "1" + (f",{gpus}" if gpus > 1 else "") if cuda else "1,3"
    return args


def cores() -> int:
    from transexplain.data.loader import available_cpus

    return available_cpus()


def make_data(root: Path, n: int, data: Path | None):
    """(image folder, gtsegs .mat of the same photos with one ellipse mask each)."""
    from PIL import Image

    from transexplain.data.gtsegs import write_gtsegs
    from transexplain.data.imagenet import imagenet_like_image, write_imagenet_like

    folder = data
    if folder is None:
        folder = root / "imagenet_like"
        t0 = time.perf_counter()
        write_imagenet_like(folder, n, workers=cores())
        print(f"wrote {n} ImageNet-like JPEGs in {time.perf_counter() - t0:.1f} s")
    images, masks = [], []
    rng = np.random.default_rng(0)
    for k in range(n):
        img = imagenet_like_image(k)
        h, w = img.shape[:2]
        img = np.asarray(Image.fromarray(img).resize((w // 2, h // 2)))  # gtsegs photos are small (~250 px)
        yy, xx = np.mgrid[: h // 2, : w // 2]
        cy, cx, ry, rx = rng.uniform(0.3, 0.7) * h / 2, rng.uniform(0.3, 0.7) * w / 2, h / 8, w / 8
        masks.append((((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1).astype(np.uint8))
        images.append(img)
    seg = write_gtsegs(root / "seg.mat", images, masks)
    return folder, seg


def measure(args, bench: str, method: str, precision: str, workers: int, data, shard=None, out: Path | None = None,
            warm: bool = True) -> dict:
    """One run of `bench` in this process: {"images", "total_s", "load_s"} (after a warm-up batch)."""
    import torch

    from transexplain.data.imagenet import ImageFolderDataset, Preprocess
    from transexplain.evaluation.perturbation import run_perturbation
    from transexplain.evaluation.segmentation import SegmentationData, run_segmentation
    from transexplain.models import as_adapter
    from transexplain.models.loading import load_model
    from transexplain.results import ResultStore

    device = args.device if shard is None else shard.device(args.device)
    loaded = measure.cache.get(args.model) or load_model(args.model, random_weights=True)
    measure.cache[args.model] = loaded
    pre = Preprocess(tuple(loaded.input_size[1:]), loaded.mean, loaded.std)
    if bench == "perturbation":
        dataset = ImageFolderDataset(data[0], pre, num_classes=as_adapter(loaded.model).num_classes)
    else:
        dataset = SegmentationData(data[1], pre)
    limit = min(args.images, len(dataset))
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))

    def once(limit, name):
        timings = {}
        store = ResultStore(tmp / name, {"benchmark": bench, "methods": [method]}, overwrite=True)
        common = dict(limit=limit, batch_size=args.batch_size, device=device, quiet=shard is not None and shard.rank > 0,
                      precision=precision, num_workers=workers, shard=shard, timings=timings)
        if bench == "perturbation":
            run_perturbation(loaded, dataset, store, [method], tests=("positive", "negative"),
                             forward_batch=max(256, 9 * args.batch_size), **common)
        else:
            run_segmentation(loaded, dataset, store, [method], forward_batch=max(256, args.batch_size), **common)
        store.close()
        return timings

    if warm:
        once(args.batch_size * (shard.world if shard else 1), "warm.h5")  # CUDA context, kernels, caches
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    result = once(limit, "run.h5")
    return result


measure.cache = {}


def rank_main(args):
    """One rank of a torchrun measurement: run this rank's part, rank 0 writes every rank's timings."""
    import torch

    from transexplain.evaluation.sharding import ProcessGroup, from_environment

    spec = json.loads(args.as_rank)
    shard = from_environment(block=args.batch_size)
    if not args.device.startswith("cuda"):
        torch.set_num_threads(max(1, cores() // shard.world))
    with ProcessGroup(shard, args.device) as group:
        data = (Path(spec["folder"]), Path(spec["seg"]))
        group.wait_for_all()
        t0 = time.perf_counter()
        timings = measure(args, spec["bench"], spec["method"], spec["precision"], spec["workers"], data, shard=shard)
        timings["wall_s"] = time.perf_counter() - t0
        everyone = group.gather(timings)
        if shard.is_main:
            Path(spec["out"]).write_text(json.dumps(everyone))


def line(label: str, images: int, seconds: float, load_s: float, cores_used: str) -> str:
    rate = images / seconds if seconds > 0 else float("nan")
    projected = IMAGENET_VAL / rate if rate > 0 else float("nan")
    return (f"| {label} | {images} | {rate:8.2f} | {100 * (1 - load_s / seconds):5.1f}% / {100 * load_s / seconds:4.1f}% "
            f"| {cores_used} | {projected / 60:8.1f} min |")


def main(argv=None):
    args = parse(argv)
    if args.as_rank:
        return rank_main(args)
    import torch

    from transexplain.data.loader import default_workers
    from transexplain.results.environment import collect_environment

    cuda = args.device.startswith("cuda")
    env = collect_environment("float64", args.device)
    card = torch.cuda.get_device_name(0) if cuda else "CPU"
    print(f"device {args.device} ({card}); {cores()} CPU cores available; torch threads {torch.get_num_threads()}; "
          f"model {args.model} (random weights); {args.images} images per row; batch {args.batch_size}")
    print(f"environment: {json.dumps(env)}")
    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    data = make_data(root, args.images, args.data)
    methods = args.methods.split(",")
    precisions = args.precisions.split(",")
    benches = ["perturbation"] + (["segmentation"] if args.segmentation == "yes" else [])
    worker_counts = sorted({0, default_workers()})
    processes = [int(p) for p in args.processes.split(",") if int(p) > 1]
    print("\n| run | images | images/s | explain / load share | cores used | 50,000 images |")
    print("|---|---|---|---|---|---|")
    for bench in benches:
        for precision in precisions:
            for method in methods:
                base = None
                first = precision == precisions[0] and method == methods[0]
                # 0 against the default number of workers once; every other row with the default
                for workers in (worker_counts if first else worker_counts[-1:]):
                    t = measure(args, bench, method, precision, workers, data)
                    base = t  # the speed-ups below are against the default number of workers
                    used = f"1 process x {torch.get_num_threads()} threads + {workers} loaders" if not cuda else \
                        f"1 GPU + {workers} loaders"
                    print(line(f"{bench} {method} {precision}, 1 process, {workers} workers", t["images"], t["total_s"],
                               t["load_s"], used), flush=True)
                if bench == "perturbation" and first:
                    # the per-image loop of the reference code, with our code at batch size 1
                    small = argparse.Namespace(**{**vars(args), "batch_size": 1,
                                                  "images": max(4, min(args.images, 16 if cuda else 4))})
                    t = measure(small, bench, method, precision, worker_counts[-1], data)
                    print(line(f"{bench} {method} {precision}, batch size 1 (per-image loop)", t["images"], t["total_s"],
                               t["load_s"], "as above"), flush=True)
                for k in (processes if precision == precisions[0] else []):
                    spec = {"bench": bench, "method": method, "precision": precision, "folder": str(data[0]),
                            "seg": str(data[1]), "workers": max(0, default_workers() // k) if not cuda else default_workers(),
                            "out": str(root / f"rank_{bench}_{method}_{precision}_{k}.json")}
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(k),
                           str(Path(__file__).resolve()), "--as-rank", json.dumps(spec), "--device", args.device,
                           "--model", args.model, "--images", str(args.images), "--batch-size", str(args.batch_size)]
                    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(
                        max(1, cores() // k))))
                    if r.returncode != 0:
                        print(f"| {bench} {method} {precision}, {k} processes | failed: {r.stderr.strip()[-300:]} |")
                        continue
                    ranks = json.loads(Path(spec["out"]).read_text())
                    images = sum(t["images"] for t in ranks)
                    seconds = max(t["total_s"] for t in ranks)
                    load_s = max(t["load_s"] for t in ranks)
                    used = (f"{k} processes x {max(1, cores() // k)} threads + {spec['workers']} loaders each"
                            if not cuda else f"{k} GPUs")
                    print(line(f"{bench} {method} {precision}, {k} processes", images, seconds, load_s, used) +
                          f" speed-up x{(images / seconds) / (base['images'] / base['total_s']):.2f} vs 1 process",
                          flush=True)
    print("\nexplain / load share: of the run's wall time, the part spent computing vs waiting for decoded images; "
          "50,000 images: the projected time of ImageNet's validation set at this rate (both perturbation tests).")


if __name__ == "__main__":
    main()
