"""The metric-suite runner: explain once, build every metric's perturbed inputs, run their forwards
in shared batches, hand the probabilities to the pure metric functions, store per-image raw values.

Metrics are pure functions (`evaluation.metrics`); this module is the only place that touches the
model: the clean forward, the explanations, one pooled forward pass over the perturbed copies of
every metric of a method (chunks of `forward_batch` inputs, copies of all metrics mixed), the
explanations of perturbed inputs (max-sensitivity) and of the cascading randomised models
(randomisation). The explained class is the model's prediction on the clean image.

Store layout (`results.store.ResultStore`, resumable batch by batch, one writer):
`images` (index, name, label, pred, p_clean), `<method>/<metric>` (value: (N,) float64, NaN where
the metric is undefined for that image; curve metrics also their per-image curves, (N, points)
float64 probabilities of the explained class: `curve` for insertion, deletion, mif, lif, aopc (the
MoRF curve) and ROAD, `curve_morf` and `curve_lerf` for srg and abpc; ROAD also `hits`,
randomisation also `per_stage`), `skipped` (index, name). A file written before srg / aopc / abpc
stored their curves is resumed with its own columns (and plotted without those curves). Summaries
(mean over finite values, n, nan count) are recomputed from those rows.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from .. import interrupt, rng
from .metrics import METRICS, curves, localisation, road, robustness, saco, sanity
from .metrics._common import nan_summary
from .perturbation import batches, maybe_kill, progress_bar, skipped_rows

#: protocol options of the suite (recorded in the results file's config)
DEFAULT_OPTIONS = {
    "curve_steps": curves.STEPS, "deletion_fill": "black", "mif_fill": "mean", "blur": [11, 5.0],
    "road_fractions": list(road.FRACTIONS), "road_noise": 0.01, "saco_groups": saco.GROUPS,
    "infidelity_sigma": robustness.INFIDELITY_SIGMA, "infidelity_samples": robustness.INFIDELITY_SAMPLES,
    "sensitivity_radius": robustness.SENSITIVITY_RADIUS, "sensitivity_samples": robustness.SENSITIVITY_SAMPLES,
    "seed": 0, "target": "pred",
    # the generator of ROAD's, infidelity's and max-sensitivity's noise (`rng.GENERATOR`): a file whose
    # noise came from another one (torch.Generator before issue 14's sixth session) is not resumed
    "noise": rng.GENERATOR,
}


def forwards_per_image(metrics, options=DEFAULT_OPTIONS) -> dict:
    """{metric: the perturbed forwards it needs per image and method} (shared copies counted once, by the first)."""
    s = options["curve_steps"] + 1
    need = {"insertion": ("ins", s), "deletion": ("del", s), "mif": ("morf", s), "aopc": ("morf", s),
            "lif": ("lerf", s), "srg": ("morf+lerf", 2 * s), "abpc": ("morf+lerf", 2 * s),
            "road_morf": ("road_morf", len(options["road_fractions"])),
            "road_lerf": ("road_lerf", len(options["road_fractions"])),
            "saco": ("saco", options["saco_groups"]), "infidelity": ("inf", options["infidelity_samples"])}
    return {m: need[m][1] if m in need else 0 for m in metrics}


def cascading_stages(model) -> list:
    """[(name, module)] from the top: the classifier head, then the Transformer blocks from the last
    to the first, then the patch embedding (those the model has)."""
    stages = []
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Module) and any(True for _ in head.parameters()):
        stages.append(("head", head))
    named = [n for n, m in model.named_modules() if n and type(m).__name__.endswith("Block")]
    outer = [n for n in named if not any(n.startswith(o + ".") for o in named)]  # blocks inside blocks are parts
    modules = dict(model.named_modules())
    stages += [(n, modules[n]) for n in reversed(outer)]
    embed = getattr(model, "patch_embed", None)
    if isinstance(embed, torch.nn.Module):
        stages.append(("patch_embed", embed))
    return stages


def cascading_randomisation(model, seed: int = 0) -> list:
    """[(stage name, model copy)]: copy k has stages 0..k re-initialised (each sub-module's own
    `reset_parameters`, seeded per stage), from the top down (Adebayo et al. 2018, cascading)."""
    current = copy.deepcopy(model)
    out = []
    for k, (name, _) in enumerate(cascading_stages(model)):
        module = dict(current.named_modules())[name]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            for sub in module.modules():
                if hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()
        out.append((name, copy.deepcopy(current)))
    return out


def _chunks(parts, size: int):
    """The inputs of `parts` (tensors of N_i inputs each, read in order) in chunks of `size` inputs:
    slices of one part where they fall inside it, a small concatenation where a chunk spans parts (so
    the copies of all metrics are never concatenated into one tensor)."""
    pending, have = [], 0
    for part in parts:
        i = 0
        while i < len(part):
            take = min(size - have, len(part) - i)
            pending.append(part[i:i + take])
            have += take
            i += take
            if have == size:
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, have = [], 0
    if pending:
        yield pending[0] if len(pending) == 1 else torch.cat(pending)


def _probs(model, inputs, target: torch.Tensor, forward_batch: int):
    """Probabilities of `target` (one per input) and argmax predictions, in chunks of `forward_batch`
    inputs; `inputs`: one tensor or a list of tensors read one after the other."""
    parts = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    p, a = [], []
    start = 0
    with torch.no_grad():
        for chunk in _chunks(parts, forward_batch):
            prob = torch.softmax(model(chunk), -1)
            p.append(prob.gather(1, target[start:start + len(chunk)].view(-1, 1))[:, 0])
            a.append(prob.argmax(-1))
            start += len(chunk)
    return torch.cat(p).double().cpu().numpy(), torch.cat(a).cpu().numpy()


def per_image_streams(seed: int, indices, method: str):
    """`noise_for(metric)` -> one counter-based `rng.Stream` per image, keyed by the run's seed, the
    image's index in the data, the method and the metric: each image's noise is the same whatever
    the batch size, the other methods and metrics of the run, where a resumed run starts, or the
    device (the draws are made on the metric's device, `rng.draw`)."""
    import zlib

    def noise_for(metric: str) -> list:
        tag = zlib.crc32(f"{method}/{metric}".encode())
        return [rng.Stream((seed * 1_000_003 + int(j)) * 2_654_435_761 % 2**61 ^ tag) for j in indices]

    return noise_for


def _copies(x, maps, metrics, opts, fill_black, noise_for):
    """{key: (B, S, C, H, W)} the perturbed copies the chosen metrics need (shared keys built once)."""
    steps = opts["curve_steps"]
    want = set(metrics)
    out = {}
    if "insertion" in want:
        blurred = curves.gaussian_blur(x, int(opts["blur"][0]), float(opts["blur"][1]))
        out["ins"] = curves.insertion_inputs(x, maps, blurred, steps)
    if "deletion" in want:
        out["del"] = curves.deletion_inputs(x, maps, fill_black, steps, True)
    fill = curves.mean_fill(x) if opts["mif_fill"] == "mean" else fill_black
    if want & {"mif", "aopc", "srg", "abpc"}:
        out["morf"] = curves.deletion_inputs(x, maps, fill, steps, True)
    if want & {"lif", "srg", "abpc"}:
        out["lerf"] = curves.deletion_inputs(x, maps, fill, steps, False)
    for name, most in (("road_morf", True), ("road_lerf", False)):
        if name in want:
            out[name] = road.road_inputs(x, maps, opts["road_fractions"], most, opts["road_noise"], noise_for(name))
    if "saco" in want:
        out["saco"] = saco.saco_inputs(x, saco.saco_groups(maps, opts["saco_groups"]))
    if "infidelity" in want:
        pert = robustness.infidelity_perturbations(x, opts["infidelity_samples"], opts["infidelity_sigma"],
                                                   noise_for("infidelity"))
        out["inf_pert"] = pert
        out["inf"] = robustness.infidelity_inputs(x, pert)
    return out


def score_method(model, explain_fn, x, pred, p_clean, masks, metrics, opts, fill_black, forward_batch,
                 noise_for, randomised=()) -> dict:
    """Every chosen metric of one method on one batch: {metric: {"value": (B,), ...}}; `noise_for(metric)`
    gives the per-image streams of a metric's random draws (`per_image_streams`)."""
    maps = explain_fn(model, x, pred).to(torch.float64)
    maps_np = maps.detach().cpu().numpy()
    b = len(x)
    copies = _copies(x, maps.to(x.device), metrics, opts, fill_black, noise_for)
    pert = copies.pop("inf_pert", None)
    keys = list(copies)
    probs, hits = {}, {}
    if keys:
        sizes = [copies[k].shape[1] for k in keys]
        flat = [copies[k].reshape(-1, *x.shape[1:]) for k in keys]  # views: no copy of every metric's copies
        targets = torch.cat([pred.repeat_interleave(s) for s in sizes])
        p, a = _probs(model, flat, targets, forward_batch)
        start = 0
        for k, s in zip(keys, sizes):
            probs[k] = p[start:start + b * s].reshape(b, s)
            hits[k] = (a[start:start + b * s].reshape(b, s) == pred.cpu().numpy()[:, None])
            start += b * s
    out = {}
    for m in metrics:
        if m == "insertion":
            out[m] = {"value": curves.insertion(probs["ins"], maps_np), "curve": probs["ins"]}
        elif m == "deletion":
            out[m] = {"value": curves.deletion(probs["del"], maps_np), "curve": probs["del"]}
        elif m == "mif":
            out[m] = {"value": curves.mif(probs["morf"], maps_np), "curve": probs["morf"]}
        elif m == "lif":
            out[m] = {"value": curves.lif(probs["lerf"], maps_np), "curve": probs["lerf"]}
        elif m == "srg":
            out[m] = {"value": curves.srg(probs["morf"], probs["lerf"], maps_np), "curve_morf": probs["morf"],
                      "curve_lerf": probs["lerf"]}
        elif m == "aopc":
            out[m] = {"value": curves.aopc(probs["morf"], maps_np), "curve": probs["morf"]}
        elif m == "abpc":
            out[m] = {"value": curves.abpc(probs["lerf"], probs["morf"], maps_np), "curve_morf": probs["morf"],
                      "curve_lerf": probs["lerf"]}
        elif m in ("road_morf", "road_lerf"):
            out[m] = {"value": road.road(probs[m], maps_np), "curve": probs[m], "hits": hits[m]}
        elif m == "saco":
            groups = saco.saco_groups(maps, opts["saco_groups"])
            out[m] = {"value": saco.saco(saco.group_salience(maps, groups), p_clean, probs["saco"], maps_np)}
        elif m == "pointing_game":
            out[m] = {"value": localisation.pointing_game(maps_np, masks)}
        elif m == "relevance_mass":
            out[m] = {"value": localisation.relevance_mass_accuracy(maps_np, masks)}
        elif m == "relevance_rank":
            out[m] = {"value": localisation.relevance_rank_accuracy(maps_np, masks)}
        elif m == "infidelity":
            out[m] = {"value": robustness.infidelity(maps.detach(), pert, p_clean, probs["inf"])}
        elif m == "max_sensitivity":
            s = opts["sensitivity_samples"]
            xs = robustness.sensitivity_perturbations(x, s, opts["sensitivity_radius"], noise_for(m))
            pm = explain_in_batches(explain_fn, model, xs.reshape(-1, *x.shape[1:]), pred.repeat_interleave(s), b)
            out[m] = {"value": robustness.max_sensitivity(maps_np, pm.reshape(b, s, *maps.shape[1:]).double().cpu())}
        elif m == "randomisation":
            # ranked where the maps are (a GPU ranks them at once); the numbers as on the CPU
            stages = torch.stack([explain_fn(rm, x, pred).detach().double() for _, rm in randomised])
            value, per_stage = sanity.randomisation(maps.detach().double(), stages)
            out[m] = {"value": value, "per_stage": per_stage}
    return out


def explain_in_batches(explain_fn, model, xs, targets, rows: int):
    """`explain_fn(model, xs, targets)` in consecutive chunks of `rows` inputs, concatenated: the S
    perturbed copies max-sensitivity explains per image go through the explainer `rows` (the run's
    batch size) at a time, so their autograd graphs take no more memory than the clean explanation's
    (one call on all B*S copies held S times as much). Every map depends on its own input only."""
    rows = max(int(rows), 1)
    return torch.cat([explain_fn(model, xs[i:i + rows], targets[i:i + rows]) for i in range(0, len(xs), rows)])


def run_suite(loaded, data, store, methods, metrics, limit=None, batch_size: int = 8, forward_batch: int = 256,
              device: str = "cpu", quiet: bool = False, precision: str = "float64", options: dict | None = None,
              method_options: dict | None = None, num_workers: int = 0, shard=None) -> dict:
    """Run every metric for every method over `data` (items `image` or `(image, mask)`), resuming
    from `store`'s last committed batch. Returns the summaries (`summarise`). num_workers: decoding
    processes; shard: this process's part of a torchrun run (`evaluation.sharding`), as the
    perturbation runner takes them (`perturbation.batches`)."""
    from .. import explain
    from ..data.imagenet import Preprocess
    from ..models import as_adapter
    from ..precision import PRECISIONS, adapter_at, at_precision, check_precision

    opts = {**DEFAULT_OPTIONS, **(options or {})}
    precision = check_precision(precision)
    model = at_precision(loaded.model.to(device).eval(), precision)
    dtype = PRECISIONS[precision]
    fill_black = Preprocess(tuple(loaded.input_size[1:]), loaded.mean, loaded.std).fill.to(device=device, dtype=dtype)
    randomised = cascading_randomisation(model, opts["seed"]) if "randomisation" in metrics else ()
    adapters = {}

    def explainer_of(method: str):
        """`explain_fn(model, x, target) -> heatmaps` of `method` (on the model or a randomised copy)."""

        def explain_fn(mdl, x, target):
            key = id(mdl)
            if key not in adapters:
                adapters[key] = adapter_at(mdl, precision) if mdl is model else as_adapter(mdl)
            return explain(adapters[key], x, method=method, target=target, precision=precision,
                           **(method_options or {}).get(method, {})).heatmap.detach()

        return explain_fn

    # a resumed file keeps the columns its groups already have (a file written before the curves of
    # srg / aopc / abpc were stored stays as it was: no column half filled)
    kept_columns: dict = {}

    def columns(group: str, cols: dict) -> dict:
        if group not in kept_columns:
            kept_columns[group] = set(store.names(group)) if store.done(group) else None
        keep = kept_columns[group]
        return cols if keep is None else {k: v for k, v in cols.items() if k in keep}

    loader, start, stop = batches(data, store, shard, limit, batch_size, num_workers, device)
    bar = progress_bar(stop, start, quiet, "evaluate")
    interrupt.progress(start, stop)
    batches_done = 0
    for batch in loader:
        rows = skipped_rows(data, batch)
        if batch.indices:
            idx = np.array(batch.indices, dtype=np.int64)
            x, masks = (batch.items[0], batch.items[1].numpy()) if isinstance(batch.items, tuple) else (batch.items, None)
            x = x.to(device=device, dtype=dtype)
            with torch.no_grad():
                prob = torch.softmax(model(x), -1)
            pred = prob.argmax(-1)
            p_clean = prob.gather(1, pred.view(-1, 1))[:, 0].double().cpu().numpy()
            labels = [data.label(j) if hasattr(data, "label") else -1 for j in batch.indices]
            rows["images"] = {"index": idx, "name": np.array([data.name(j) for j in batch.indices], dtype=object),
                              "label": np.array(labels, dtype=np.int64), "pred": pred.cpu().numpy(),
                              "p_clean": p_clean}
            for method in methods:
                noise_for = per_image_streams(int(opts["seed"]), batch.indices, method)
                scores = score_method(model, explainer_of(method), x, pred, p_clean, masks, metrics, opts, fill_black,
                                      forward_batch, noise_for, randomised)
                for m, cols in scores.items():
                    group = f"{method}/{m}"
                    rows[group] = columns(group, {"index": idx, **{k: np.asarray(v) for k, v in cols.items()}})
        store.write_batch(rows, position=batch.position)
        interrupt.progress(batch.position, stop)
        batches_done += 1
        bar.update(batch.position - bar.n)
        maybe_kill(batches_done)
    bar.close()
    return summarise(store, methods, metrics)


def summarise_stored(store) -> dict:
    """`summarise` with the methods and metrics of the store's own config (merging shards)."""
    return summarise(store, store.config["methods"], store.config["metrics"])


def summarise(store, methods, metrics) -> dict:
    """{method: {metric: {"mean", "n", "nan"}}} from the stored per-image values; written as summaries."""
    out = {}
    for method in methods:
        out[method] = {}
        for m in metrics:
            group = f"{method}/{m}"
            values = store.read(group, "value") if store.done(group) else np.zeros(0)
            out[method][m] = nan_summary(values)
            if not store.read_only:
                store.set_summary(group, out[method][m])
    if not store.read_only:
        skipped = store.read("skipped", "name").tolist() if store.done("skipped") else []
        store.set_summary("images", {"n": int(store.done("images")), "skipped": len(skipped),
                                     "skipped_names": skipped[:50]})
    return out


def rank_agreement(table: dict, metrics) -> np.ndarray:
    """(M, M) Kendall τ between the method rankings of every pair of metrics (each metric oriented so
    that better is larger); NaN where fewer than two methods have both values."""
    from scipy.stats import kendalltau

    methods = list(table)
    k = len(metrics)
    tau = np.full((k, k), np.nan)
    for a in range(k):
        for b in range(k):
            va = np.array([table[m][metrics[a]]["mean"] for m in methods], dtype=np.float64)
            vb = np.array([table[m][metrics[b]]["mean"] for m in methods], dtype=np.float64)
            va = va if METRICS[metrics[a]].higher_is_better else -va
            vb = vb if METRICS[metrics[b]].higher_is_better else -vb
            ok = np.isfinite(va) & np.isfinite(vb)
            if ok.sum() >= 2:
                tau[a, b] = kendalltau(va[ok], vb[ok]).statistic
    return tau
