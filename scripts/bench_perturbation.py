"""Measure the per-image cost of the perturbation test against one plain forward, side by side.

For one batch of images (the embedded validation set and model by default) this times, per image:
  forward      one plain forward pass;
  explanation  the explanation (e.g. transformer_attribution: forward + backward);
  test         the whole perturbation test as `run_perturbation` runs it for one test: clean
               forward, explanation, one argsort, nine masked copies, their forwards.
It prints test / forward and the budget (explanation + 10 forwards) / forward, and their ratio;
the target is ratio <= 1.2. Each figure is the minimum over --repeats runs.

    .venv/bin/python scripts/bench_perturbation.py [--model embedded] [--method transformer_attribution]
        [--batch-size 32] [--repeats 3] [--threads N] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import torch


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    from transexplain import explain
    from transexplain.data.imagenet import ImageFolderDataset, Preprocess
    from transexplain.evaluation.perturbation import perturbation_hits, predict
    from transexplain.models import as_adapter
    from transexplain.models.loading import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--method", default="transformer_attribution")
    parser.add_argument("--data", default=None, help="image folder (default: the embedded validation set)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model)
    model = loaded.model.to(args.device).eval()
    adapter = as_adapter(model)
    pre = Preprocess(tuple(loaded.input_size[1:]), loaded.mean, loaded.std)
    if args.data is None:
        from transexplain.data.shapes import embedded_paths

        args.data = embedded_paths()["val"]
    ds = ImageFolderDataset(args.data, pre, num_classes=adapter.num_classes, class_names=loaded.class_names)
    n = min(args.batch_size, len(ds))
    x = torch.stack([ds.load(i) for i in range(n)]).to(args.device)
    y = torch.tensor([ds.label(i) for i in range(n)], device=args.device)
    fill = pre.fill.to(args.device)
    forward_batch = max(256, 9 * n)

    def plain_forward():
        predict(model, x, forward_batch)

    def explanation():
        explain(adapter, x, method=args.method, target=y)

    def whole_test():
        pred = predict(model, x, forward_batch)
        maps = explain(adapter, x, method=args.method, target=pred).heatmap
        perturbation_hits(model, x, maps, y, fill, True, forward_batch)

    explanation()  # warm-up (lazy initialisation, allocator)
    whole_test()
    t_forward = timed(plain_forward, args.repeats) / n
    t_explain = timed(explanation, args.repeats) / n
    t_test = timed(whole_test, args.repeats) / n
    budget = t_explain + 10 * t_forward
    print(f"model {loaded.name} {tuple(loaded.input_size)}, method {args.method}, {n} images per batch, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    print(f"per image: forward {1000 * t_forward:.2f} ms, explanation {1000 * t_explain:.2f} ms, "
          f"whole perturbation test {1000 * t_test:.2f} ms")
    print(f"perturbation test / forward = {t_test / t_forward:.2f}")
    print(f"(explanation + 10 forwards) / forward = {budget / t_forward:.2f}")
    ratio = t_test / budget
    print(f"ratio = {ratio:.3f} (target <= 1.2: {'met' if ratio <= 1.2 else 'NOT met'})")


if __name__ == "__main__":
    main()
