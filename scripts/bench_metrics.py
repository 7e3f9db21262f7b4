"""Cost of each metric of the suite per image, as a ratio to the forwards it needs, side by side.

For one batch of images (the embedded shapes segmentation set, resized to the model's input) this
times, per metric, `suite.score_method` restricted to that metric, *without* the clean explanation
(that one is shared by every metric and is the method's cost, not the metric's: the maps are made
once and handed back), and, in the same run, interleaved with it, the work the metric cannot avoid:

  forwards     the plain forwards of the perturbed copies the metric needs (steps x images, in chunks
               of --forward-batch inputs of the same shape, `model(x)` under no_grad, nothing else);
  explanations max_sensitivity: the method's explanation of S inputs per image (B*S inputs, B at a
               time, as the suite runs them: `suite.explain_in_batches`); randomisation: one explanation of the batch per cascading stage, on the
               randomised models (the models are randomised once per run, outside the timing).

ratio = metric time / that baseline (target <= 1.2). Localisation metrics need no forward at all:
their time is printed, without a ratio. The `suite` row runs every chosen metric together (shared
copies built and run once), against the sum of the distinct forwards and explanations.
Each figure is the median over --repeats interleaved repetitions (metric, baseline, metric, ...);
`--clock cpu` times this process's CPU time instead of the wall clock (steadier on a shared machine).
For ROAD, extra rows time the imputation alone (`road_inputs`) with each solver.

    .venv/bin/python scripts/bench_metrics.py [--model embedded] [--random-weights] [--method rollout]
        [--metrics all] [--batch-size 8] [--repeats 3] [--device cpu] [--precision float64] [--threads N]
        [--clock wall|cpu] [--road-solver auto|block|mg|cg|scipy]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, clock=time.perf_counter) -> float:
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


def distinct_forwards(metrics, opts) -> dict:
    """{copy key: forwards per image} of the perturbed copies `metrics` need together (shared once)."""
    from transexplain.evaluation.metrics import road

    s = opts["curve_steps"] + 1
    want = set(metrics)
    keys = {}
    if "insertion" in want:
        keys["ins"] = s
    if "deletion" in want:
        keys["del"] = s
    if want & {"mif", "aopc", "srg", "abpc"}:
        keys["morf"] = s
    if want & {"lif", "srg", "abpc"}:
        keys["lerf"] = s
    for name in ("road_morf", "road_lerf"):
        if name in want:
            keys[name] = len(opts.get("road_fractions", road.FRACTIONS))
    if "saco" in want:
        keys["saco"] = opts["saco_groups"]
    if "infidelity" in want:
        keys["inf"] = opts["infidelity_samples"]
    return keys


def main():
    from transexplain import explain
    from transexplain.data.imagenet import Preprocess
    from transexplain.data.shapes import embedded_paths
    from transexplain.evaluation.metrics import resolve_metrics
    from transexplain.evaluation.segmentation import SegmentationData
    from transexplain.evaluation.suite import (DEFAULT_OPTIONS, cascading_randomisation, explain_in_batches,
                                               per_image_streams, score_method)
    from transexplain.models import as_adapter
    from transexplain.models.loading import load_model
    from transexplain.precision import PRECISIONS, adapter_at, at_precision

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="embedded, embedded-swin, a timm name (e.g. vit_base_patch16_224)")
    parser.add_argument("--random-weights", action="store_true", help="the architecture with seeded random weights")
    parser.add_argument("--method", default="rollout")
    parser.add_argument("--metrics", default="all")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--forward-batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="float64")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-suite", action="store_true", help="skip the all-metrics-together row")
    parser.add_argument("--suite-only", action="store_true", help="only the all-metrics-together row")
    parser.add_argument("--road-solver", default="auto", choices=("auto", "block", "mg", "cg", "scipy"),
                        help="the imputation solver ROAD's metrics use (auto: road.auto_method's choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall time, or this process's CPU time (all its threads; steadier on a shared CPU)")
    args = parser.parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU work: use it with --device cpu")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.road_solver != "auto":
        from transexplain.evaluation.metrics import road

        road.auto_method = lambda _x, solver=args.road_solver: solver

    loaded = load_model(args.model, random_weights=args.random_weights)
    device = args.device
    model = at_precision(loaded.model.to(device).eval(), args.precision)
    dtype = PRECISIONS[args.precision]
    pre = Preprocess(tuple(loaded.input_size[1:]), loaded.mean, loaded.std)
    data = SegmentationData(embedded_paths()["seg"], pre)
    items = [data.load(i) for i in range(min(args.batch_size, len(data)))]
    x = torch.stack([torch.as_tensor(a) for a, _ in items]).to(device=device, dtype=dtype)
    masks = torch.stack([torch.as_tensor(m) for _, m in items]).numpy()
    b = len(x)
    opts = dict(DEFAULT_OPTIONS)
    metrics = resolve_metrics(args.metrics)
    fill_black = pre.fill.to(device=device, dtype=dtype)
    randomised = cascading_randomisation(model, opts["seed"]) if "randomisation" in metrics else ()
    adapters = {}

    def explain_any(mdl, inputs, target):
        key = id(mdl)
        if key not in adapters:
            adapters[key] = adapter_at(mdl, args.precision) if mdl is model else as_adapter(mdl)
        return explain(adapters[key], inputs, method=args.method, target=target, precision=args.precision).heatmap.detach()

    with torch.no_grad():
        prob = torch.softmax(model(x), -1)
    pred = prob.argmax(-1)
    p_clean = prob.gather(1, pred.view(-1, 1))[:, 0].double().cpu().numpy()
    clean_maps = explain_any(model, x, pred)

    def cached(mdl, inputs, target):  # the clean maps are the method's cost, shared by every metric
        if mdl is model and inputs is x:
            return clean_maps
        return explain_any(mdl, inputs, target)

    noise_for = per_image_streams(int(opts["seed"]), range(b), args.method)
    s_sens = opts["sensitivity_samples"]
    xs_sens = x.unsqueeze(1).expand(b, s_sens, *x.shape[1:]).reshape(-1, *x.shape[1:]).clone()
    big = None

    def plain_forwards(n: int):
        nonlocal big
        if big is None or len(big) < n:
            big = x.repeat((n + b - 1) // b, 1, 1, 1)[:max(n, 1)].clone()
        with torch.no_grad():
            for i in range(0, n, args.forward_batch):
                model(big[i:min(n, i + args.forward_batch)])

    def baseline_of(ms):
        n = sum(distinct_forwards(ms, opts).values()) * b
        extra = []
        if "max_sensitivity" in ms:
            extra.append(lambda: explain_in_batches(explain_any, model, xs_sens, pred.repeat_interleave(s_sens), b))
        if "randomisation" in ms:
            extra += [lambda rm=rm: explain_any(rm, x, pred) for _, rm in randomised]

        def run():
            if n:
                plain_forwards(n)
            for e in extra:
                e()
        return run, n // b, (s_sens if "max_sensitivity" in ms else 0) + (len(randomised) if "randomisation" in ms else 0)

    rows = ([] if args.suite_only else [[m] for m in metrics]) + ([] if args.no_suite or len(metrics) < 2 else [metrics])
    jobs = []
    for ms in rows:
        base, fwd, expl = baseline_of(ms)

        def metric(ms=ms):
            score_method(model, cached, x, pred, p_clean, masks, ms, opts, fill_black, args.forward_batch,
                         noise_for, randomised)
        jobs.append((ms, metric, base if (fwd or expl) else None, fwd, expl))
    road_ms = [m for m in metrics if m in ("road_morf", "road_lerf")]
    if road_ms:  # the imputation alone (ROAD's overhead over its forwards), each solver, in the same repetitions
        from transexplain.evaluation.metrics import road

        for solver in ("block", "mg", "scipy"):
            def impute(solver=solver):
                road.road_inputs(x, clean_maps.to(torch.float64), opts["road_fractions"], road_ms[0] == "road_morf",
                                 opts["road_noise"], noise_for(road_ms[0]), method=solver)
            jobs.append(([f"{road_ms[0]} imputation only, {solver}"], impute, None, 0, 0))

        def draws():  # the float64 noise of those imputations alone (one rng.Stream per image, on the metric's device)
            from transexplain.evaluation.metrics._common import noise

            f = len(opts["road_fractions"])
            noise((b * f, *x.shape[1:]), [g for g in noise_for(road_ms[0]) for _ in range(f)], device=x.device).to(x)
        jobs.append(([f"{road_ms[0]} noise draws only"], draws, None, 0, 0))
    for _, metric, base, _, _ in jobs:  # warm-up
        metric()
        if base:
            base()
    times = {i: ([], []) for i in range(len(jobs))}
    for _ in range(args.repeats):
        for i, (_, metric, base, _, _) in enumerate(jobs):
            times[i][0].append(timed(metric, device, clock))
            if base:
                times[i][1].append(timed(base, device, clock))

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"model {loaded.name} {tuple(loaded.input_size)} ({'random weights' if args.random_weights else 'trained'}), "
          f"method {args.method}, precision {args.precision}, {b} images per batch, forward batch {args.forward_batch}, "
          f"device {device}, {torch.get_num_threads()} threads, load average {load:.2f}, {args.clock} clock, "
          f"median of {args.repeats}")
    print("| metric | forwards/image | ms/image | forwards-only ms/image | ratio |")
    print("|---|---|---|---|---|")
    for i, (ms, _, base, fwd, expl) in enumerate(jobs):
        name = ms[0] if len(ms) == 1 else f"suite ({len(ms)} metrics)"
        if "imputation only" in name or "draws only" in name:
            chosen = " (the metrics' solver)" if "imputation" in name and name.endswith(road.auto_method(x)) else ""
            print(f"| ({name}{chosen}) | 0 | {1000 * statistics.median(times[i][0]) / b:.2f} | — | — |")
            continue
        t = 1000 * statistics.median(times[i][0]) / b
        need = f"{fwd}" + (f" + {expl} explanations" if expl else "")
        if base is None:
            print(f"| {name} | 0 | {t:.2f} | — | — |")
            continue
        tb = 1000 * statistics.median(times[i][1]) / b
        print(f"| {name} | {need} | {t:.2f} | {tb:.2f} | {t / tb:.2f} |")


if __name__ == "__main__":
    main()
