"""Time and peak memory of every explainer as a ratio to a plain timm forward, side by side.

ViT-B/16 shapes (random weights), 224x224, on the CPU (or `--device cuda`). For each batch size the plain (float32) forward and
every method in each precision (`float32`, the fast mode; `mixed`, the default that gives the same
maps on every CPU; `float64`, all float64) are timed in interleaved rounds (median of `--repeats`),
so background load hits them alike. Printed per method: each precision's time as a ratio to the
plain forward, the float32 target, and each other precision's time / float32's (target for the
default, mixed: <= 2). Peak memory per image is measured in a fresh subprocess per method (peak RSS above the
RSS after loading the model), next to that of a plain forward+backward.

    python scripts/bench_explainers.py [--model vit_base_patch16_224] [--batches 1 8] [--repeats 3] [--device cuda]

`--model` takes a timm name or another family's `--model` form (torchvision:vit_b_16, hf:FOLDER).

    python scripts/bench_explainers.py --families [--repeats 2] [--methods ...]

`--families` times every family of `transexplain.models.families.FAMILIES` at one CPU-affordable
size (`BENCH`: ViT-Ti's width 192, 3 heads of 64, MLP 768, but 2 blocks and 112x112 images, i.e.
49 patches + the class token; Swin: embedding width 32, heads 1-2-4 (head width 32, as Swin-T),
depths 1-1-2 at 112x112, window 7; text: 50 tokens, a 30522-word vocabulary), batch 8, float32,
CPU, each method as a ratio to that family's own
plain forward, in interleaved rounds per family. It prints the family x method table, each family's
forward time and forward+backward ratio, and the (family, method) cells that differ by more than
20% from the timm ViT's ratio at the same size. The many-gradient methods (integrated gradients,
SmoothGrad, the Beyond-Intuition methods) are left out by default: their cost is a fixed number of
forward+backward passes, which the forward+backward column gives per family.

Every method is given the class to explain (`TARGET_CLASS`), as the benchmark runners give it.
"forward+backward" is a forward and the gradient of the top logits with respect to the input only
(`_forward_backward`): the weights' gradients, which no explainer needs, are not computed.

Targets are in units of a plain forward, except those of the methods that are many gradients
(integrated gradients, SmoothGrad: `TARGETS_FWD_BWD`), which are in units of one forward+backward,
timed in the same rounds. The `floor` column is each method's cost floor from its section of
docs/methods.md (`FLOORS`: forwards + forward+backward passes, in forward units with the measured
forward+backward); a method without an explicit target is held to 1.2 x its floor. On CUDA the peak memory is torch's peak allocation of one call.
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
#: each method's cost floor as stated in its docs/methods.md section, in (forwards, forward+backward
#: passes) at the default options: the work its definition cannot avoid. The methods without a
#: target above are held to 1.2 x their floor (the slack the attention-gradient targets allow).
#: (integrated gradients and SmoothGrad return the clean logits too: one forward of the clean input
#: besides their 20 gradients)
FLOORS = {"saliency": (0, 1), "input_x_gradient": (0, 1), "integrated_gradients": (1, 20), "smoothgrad": (1, 20),
          "legrad": (0, 1), "attcat": (0, 1), "tokentm": (0, 1), "bt_h": (0, 20), "bt_t": (0, 20),
          "attnlrp": (0, 1), "cp_lrp": (0, 1), "generic_attention": (0, 1), "gradcam": (0, 1),
          "rollout": (1, 0), "raw_attention": (1, 0)}
FLOOR_SLACK = 1.2
#: the class every method explains, given as the benchmark runners give it (perturbation, segmentation
#: and the suite pass the label or the prediction): no method runs a forward to find it
TARGET_CLASS = 1


def target_of(method: str, fwd_bwd: float):
    """(target, floor) in forward units for `method`, given the measured forward+backward ratio."""
    floor = None
    if method in FLOORS:
        n_f, n_g = FLOORS[method]
        floor = n_f + n_g * fwd_bwd
    if method in TARGETS:
        return TARGETS[method], floor
    if method in TARGETS_FWD_BWD:
        return round(TARGETS_FWD_BWD[method] * fwd_bwd, 1), floor
    return (None if floor is None else round(FLOOR_SLACK * floor, 1)), floor


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
        _forward_backward(model, x)
    else:
        transexplain.explain(model, x, method, precision=precision, target=TARGET_CLASS)


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


#: the size of every family in `--families`
BENCH = dict(width=192, heads=3, mlp=768, depth=2, img=112, patch=16, swin_embed=32, swin_depths=(1, 1, 2),
             swin_heads=(1, 2, 4), window=7, text_tokens=50, batch=8)
#: left out of `--families` unless named with --methods (a fixed number of gradients each)
MANY_GRADIENTS = ("random", "integrated_gradients", "smoothgrad", "bt_h", "bt_t")
REFERENCE_FAMILY = "timm ViT / DeiT (class token)"


def bench_instance(family):
    """(model, batch) of `family` at the `BENCH` size, seeded random weights. The family's tiny
    builder says which class (and for timm, which architecture and options); the sizes are replaced."""
    import transformers
    from transexplain.models.families import FAMILIES, _recorded_timm_calls

    b = BENCH
    torch.manual_seed(0)
    with _recorded_timm_calls() as calls:
        tiny = FAMILIES[family][1]().eval()
    name = type(tiny).__name__
    images = torch.randn(b["batch"], 3, b["img"], b["img"])
    swin_hf = dict(image_size=b["img"], patch_size=4, embed_dim=b["swin_embed"], depths=list(b["swin_depths"]),
                   num_heads=list(b["swin_heads"]), window_size=b["window"])
    vit_hf = dict(image_size=b["img"], patch_size=b["patch"], hidden_size=b["width"], num_hidden_layers=b["depth"],
                  num_attention_heads=b["heads"], intermediate_size=b["mlp"])
    torch.manual_seed(0)
    if getattr(tiny, "canonized_from", None) == "CLIPModel":
        from transexplain.models.canonizers import clip_vit

        config = transformers.CLIPConfig(
            text_config=dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             max_position_embeddings=20, bos_token_id=0, eos_token_id=1, pad_token_id=1),
            vision_config=vit_hf, projection_dim=512)
        return clip_vit(transformers.CLIPModel(config), torch.randn(1000, 512)).eval(), images
    if name.endswith("ForSequenceClassification"):
        config = tiny.config
        sizes = dict(hidden_size=b["width"], num_hidden_layers=b["depth"], num_attention_heads=b["heads"],
                     intermediate_size=b["mlp"], dim=b["width"], n_layers=b["depth"], n_heads=b["heads"],
                     hidden_dim=b["mlp"], embedding_size=b["width"], vocab_size=30522, max_position_embeddings=512,
                     position_buckets=256, pooler_hidden_size=b["width"])
        for key, value in sizes.items():
            if key in config.to_dict():
                setattr(config, key, value)
        config.num_labels = 2
        model = type(tiny)(config).eval()
        ids = torch.randint(1000, 30000, (b["batch"], b["text_tokens"]))
        ids[:, 0] = 101
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if calls:
        import timm

        arch, kwargs = calls[-1]
        kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained", "num_classes")}
        if "depths" in kwargs:
            kwargs.update(img_size=b["img"], patch_size=4, embed_dim=b["swin_embed"], depths=b["swin_depths"],
                          num_heads=b["swin_heads"], window_size=b["window"])
        else:
            kwargs.update(img_size=b["img"], patch_size=b["patch"], embed_dim=b["width"], depth=b["depth"],
                          num_heads=b["heads"])
        return timm.create_model(arch, pretrained=False, num_classes=1000, **kwargs).eval(), images
    if name == "VisionTransformer":  # torchvision
        from torchvision.models.vision_transformer import VisionTransformer

        return VisionTransformer(image_size=b["img"], patch_size=b["patch"], num_layers=b["depth"], num_heads=b["heads"],
                                 hidden_dim=b["width"], mlp_dim=b["mlp"]).eval(), images
    if isinstance(tiny, transformers.PreTrainedModel):
        config = tiny.config
        for key, value in {**vit_hf, **(swin_hf if "depths" in config.to_dict() else {})}.items():
            if key in config.to_dict():
                setattr(config, key, value)
        if "depths" in config.to_dict():  # Swin: the stage count and the last stage's width follow the depths
            config.num_layers = len(b["swin_depths"])
            config.hidden_size = int(b["swin_embed"] * 2 ** (len(b["swin_depths"]) - 1))
        config.num_labels = 1000
        return type(tiny)(config).eval(), images
    raise ValueError(f"no bench size for {family} ({name})")


def _forward(model, x):
    out = model(**x) if isinstance(x, dict) else model(x)
    return getattr(out, "logits", out)  # Hugging Face models return an output object


def _forward_backward(model, x):
    """A forward and the gradient of the top logits with respect to the input (pixels; for text,
    the word-embedding output): what every gradient explainer computes. The weights' gradients
    are never asked for, as by no explainer (with them, `.backward()` costs ~0.9 forwards more
    on ViT-B: two matrix products per linear layer instead of one)."""
    captured = []
    handle = None
    if isinstance(x, dict):
        emb = model.get_input_embeddings()
        handle = emb.register_forward_hook(lambda mod, args, out: captured.append(out))
    else:
        x = x.detach().requires_grad_(True)
        captured.append(x)
    try:
        score = _forward(model, x).max(-1).values.sum()
    finally:
        if handle is not None:
            handle.remove()
    torch.autograd.grad(score, captured[0])


def families_main(args):
    """The family x method table of ratios to each family's own plain forward (float32, CPU)."""
    from transexplain.explainers import method_names
    from transexplain.explainers.base import refusal
    from transexplain.models import as_adapter
    from transexplain.models.families import FAMILIES

    methods = args.methods or [m for m in method_names() if m not in MANY_GRADIENTS]
    print(f"families at {BENCH}, float32, CPU threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"load average {' '.join(f'{v:.1f}' for v in __import__('os').getloadavg())}", flush=True)
    table, fwd_ms, fwd_bwd, skipped = {}, {}, {}, {}
    # the reference is timed twice and the first pass thrown away: the process's one-time costs (lazy
    # imports, first allocations, kernel selection) fell on whichever family came first (measured: the
    # first family's saliency at 9.3x a forward against 4.4-5.9x for every same-sized family after it)
    families = [REFERENCE_FAMILY, REFERENCE_FAMILY] + [f for f in FAMILIES if f != REFERENCE_FAMILY]
    if args.only:
        families = [f for f in families if f == REFERENCE_FAMILY or any(o.lower() in f.lower() for o in args.only)]
    for index, family in enumerate(families):
        t_family = time.perf_counter()
        try:
            model, x = bench_instance(family)
            adapter = as_adapter(model)
        except Exception as err:  # a family the bench cannot size: said, not fatal
            skipped[family] = f"{type(err).__name__}: {err}"
            print(f"{family}: skipped ({skipped[family]})", flush=True)
            continue
        runnable = [m for m in methods if refusal(m, adapter) is None]

        def call(m):
            if m == "forward":
                with torch.no_grad():
                    _forward(model, x)
            elif m == "forward+backward":
                _forward_backward(model, x)
            else:
                import transexplain

                transexplain.explain(adapter, x, m, precision="float32", target=TARGET_CLASS)

        entries = ["forward", "forward+backward"] + runnable
        for m in entries:
            call(m)
        times = {m: [] for m in entries}
        for _ in range(args.repeats):
            for m in entries:
                t0 = time.perf_counter()
                call(m)
                times[m].append(time.perf_counter() - t0)
        fwd = statistics.median(times["forward"])
        fwd_ms[family] = fwd * 1000
        fwd_bwd[family] = statistics.median(times["forward+backward"]) / fwd
        table[family] = {m: statistics.median(times[m]) / fwd for m in runnable}
        if index == 0:
            print(f"(warm-up pass of the reference, not used: " + ", ".join(f"{m} {r:.2f}" for m, r in table[family].items())
                  + ")", flush=True)
            continue
        print(f"{family}: forward {fwd * 1000:.0f} ms, forward+backward {fwd_bwd[family]:.2f} x "
              f"({time.perf_counter() - t_family:.0f} s): " + ", ".join(f"{m} {r:.2f}" for m, r in table[family].items()),
              flush=True)
    print_family_table(table, fwd_ms, fwd_bwd, methods, skipped)


def print_family_table(table, fwd_ms, fwd_bwd, methods, skipped):
    ref = table.get(REFERENCE_FAMILY, {})
    fams = list(table)
    print("\n| method | " + " | ".join(fams) + " |")
    print("|---|" + "---|" * len(fams))
    print("| plain forward, ms (batch 8) | " + " | ".join(f"{fwd_ms[f]:.0f}" for f in fams) + " |")
    print("| forward+backward | " + " | ".join(f"{fwd_bwd[f]:.2f}" for f in fams) + " |")
    for m in methods:
        cells = []
        for f in fams:
            r = table[f].get(m)
            if r is None:
                cells.append("–")
                continue
            flag = "**" if m in ref and abs(r / ref[m] - 1) > 0.2 else ""
            cells.append(f"{flag}{r:.2f}{flag}")
        print(f"| `{m}` | " + " | ".join(cells) + " |")
    print("\nDiffering by more than 20% from the timm ViT's ratio (bold above):")
    for f in fams[1:]:
        off = [f"{m} {table[f][m]:.2f} vs {ref[m]:.2f}" for m in methods if m in table[f] and m in ref
               and abs(table[f][m] / ref[m] - 1) > 0.2]
        if off:
            print(f"- {f}: " + "; ".join(off))
    for f, why in skipped.items():
        print(f"- {f}: not timed ({why})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--families", action="store_true", help="every family at one CPU-affordable size (see the docstring)")
    ap.add_argument("--only", nargs="+", help="with --families: only the families whose name contains one of these (and the reference)")
    ap.add_argument("--_memory_child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.families:
        families_main(args)
        return
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
        print(f"{'method':26s}{head} {'floor':>7s} {'f32 target':>12s}{rel_head}")
        for m in methods:
            ratios = {p: statistics.median(times[(m, p)]) / fwd for p in args.precisions}
            target, floor = target_of(m, fwd_bwd)
            line = f"{m:26s}" + "".join(f" {ratios[p]:14.2f}" for p in args.precisions)
            line += f" {floor:7.2f}" if floor is not None else f" {'':7s}"
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
