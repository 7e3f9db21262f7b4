"""Accuracy-vs-removed-fraction curves of a perturbation run: one panel per test."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .tables import DISPLAY, ordered, partial_label, reporting_view


def plot_curves(path, out_png) -> Path:
    """Draw the stored curves of a perturbation results file to `out_png` (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..evaluation.metrics import CURVE_X
    from .store import ResultStore

    store = reporting_view(ResultStore(path))
    if store.benchmark != "perturbation":
        raise UserError(f"{path} holds a {store.benchmark} run and --plot draws perturbation curves: give a perturbation results file.")
    config = store.config
    tests = [t for t in ("positive", "negative") if t in config.get("tests", [])]
    methods = ordered(config.get("methods", []))
    fig, axes = plt.subplots(1, len(tests), figsize=(5.5 * len(tests), 4.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, test in zip(axes[0], tests):
        for k, method in enumerate(methods):
            for target in config.get("targets", []):
                summary = store.summary(f"{method}/{target}/{test}")
                if not summary.get("curve"):
                    continue
                style = "-" if target == "pred" else "--"
                ax.plot(CURVE_X, [100 * v for v in summary["curve"]], style, marker="o", markersize=3,
                        color=colours[k % len(colours)],
                        label=f"{DISPLAY.get(method, method)} ({target}, AUC {summary['auc']:.1f})")
        ax.set_title(f"{test.capitalize()} perturbation ({'lower' if test == 'positive' else 'higher'} is better)")
        ax.set_xlabel("fraction of pixels removed")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_xlim(0, 0.9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    partial = partial_label(store)
    if partial:
        fig.suptitle(partial.capitalize(), color="darkred")
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


#: how the x axis of each curve metric of the suite reads (the point k of a curve of S steps has
#: floor(H*W*k/S) pixels changed: x = k / S; ROAD's points are its removal fractions)
SUITE_AXES = {
    "insertion": ("fraction of pixels inserted into the blurred image (most relevant first)", "p(ŷ)"),
    "deletion": ("fraction of pixels deleted (most relevant first)", "p(ŷ)"),
    "mif": ("fraction of pixels occluded (most influential first)", "p(ŷ)"),
    "lif": ("fraction of pixels occluded (least influential first)", "p(ŷ)"),
    "aopc": ("fraction of pixels occluded (most relevant first; AOPC = mean drop from x = 0)", "p(ŷ)"),
    "srg": ("fraction of pixels occluded (solid: least, dashed: most influential first)", "p(ŷ)"),
    "abpc": ("fraction of pixels occluded (solid: LeRF, dashed: MoRF; ABPC = mean gap)", "p(ŷ)"),
    "road_morf": ("fraction of pixels removed and imputed (most relevant first)", "p(ŷ)"),
    "road_lerf": ("fraction of pixels removed and imputed (least relevant first)", "p(ŷ)"),
}


def suite_curves(store) -> dict:
    """{metric: {"x": (K,), "xlabel", "ylabel", "series": {method: {column: (K,) mean curve}}}} of a
    suite results file: for every metric whose groups store per-image curves (`curve`, or
    `curve_morf` / `curve_lerf`), the mean over the images where the metric is defined (finite
    value, as the table's mean) of each method's stored curves."""
    import numpy as np

    config = store.config
    protocol = config.get("protocol", {})
    out = {}
    for metric in config.get("metrics", []):
        series = {}
        for method in config.get("methods", []):
            group = f"{method}/{metric}"
            if not store.done(group):
                continue
            names = [n for n in ("curve", "curve_lerf", "curve_morf") if n in store.names(group)]
            if not names:
                continue
            ok = np.isfinite(store.read(group, "value"))
            if not ok.any():
                continue
            series[method] = {n: store.read(group, n)[ok].mean(0) for n in names}
        if not series:
            continue
        points = len(next(iter(next(iter(series.values())).values())))
        if metric.startswith("road_") and len(protocol.get("road_fractions", [])) == points:
            x = np.asarray(protocol["road_fractions"], dtype=np.float64)
        elif metric in SUITE_AXES:
            x = np.arange(points) / max(1, points - 1)
        else:
            x = np.arange(points, dtype=np.float64)
        xlabel, ylabel = SUITE_AXES.get(metric, ("point of the stored curve", "value"))
        if config.get("modality") == "text":  # the text suite ranks document tokens
            xlabel = xlabel.replace("pixels", "document tokens")
        out[metric] = {"x": x, "xlabel": xlabel, "ylabel": ylabel, "series": series}
    return out


def _suite_target(out, name: str) -> Path:
    """`out` a directory: out/<name>.png; `out` ending in .png: <stem>_<name>.png beside it."""
    out = Path(out)
    if out.suffix.lower() == ".png":
        return out.with_name(f"{out.stem}_{name}.png")
    return out / f"{name}.png"


def plot_suite(path, out) -> dict:
    """Draw a suite results file (`tx-bench evaluate`): one PNG per curve metric (each method's mean
    curve over the images, `suite_curves`) and a heatmap of the rank-agreement matrix (Kendall τ).
    `out`: a directory (created), or a .png path whose stem prefixes the files. Returns {"files":
    [paths], "lines": {metric: {label: (x, y)}}} with the line data as drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..evaluation.metrics import METRICS
    from ..evaluation.suite import rank_agreement, summarise
    from .store import ResultStore

    store = reporting_view(ResultStore(path))
    if store.benchmark != "suite":
        raise UserError(f"{path} holds a {store.benchmark} run and plot_suite draws a metric suite: give a `tx-bench evaluate` results file.")
    files, lines = [], {}
    partial = partial_label(store)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = ordered(store.config.get("methods", []))
    for metric, data in suite_curves(store).items():
        fig, ax = plt.subplots(figsize=(6.0, 4.2))
        for k, method in enumerate(m for m in methods if m in data["series"]):
            for column, y in data["series"][method].items():
                style = "--" if column == "curve_morf" else "-"
                label = DISPLAY.get(method, method) + {"curve": "", "curve_morf": " (MoRF)", "curve_lerf": " (LeRF)"}[column]
                ax.plot(data["x"], y, style, marker="o", markersize=3, color=colours[k % len(colours)], label=label)
        spec = METRICS.get(metric)
        better = "" if spec is None else (" (higher is better)" if spec.higher_is_better else " (lower is better)")
        ax.set_title(f"{metric}{better}: mean curve over images")
        ax.set_xlabel(data["xlabel"])
        ax.set_ylabel(data["ylabel"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if partial:
            fig.suptitle(partial.capitalize(), color="darkred")
        lines[metric] = {line.get_label(): (np.asarray(line.get_xdata(), dtype=np.float64),
                                            np.asarray(line.get_ydata(), dtype=np.float64)) for line in ax.get_lines()}
        files.append(_save(fig, _suite_target(out, metric)))
    metrics = list(store.config.get("metrics", []))
    tau = rank_agreement(summarise(store, store.config.get("methods", []), metrics), metrics)
    size = max(4.0, 0.45 * len(metrics) + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    cmap = plt.get_cmap("coolwarm").with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(tau), cmap=cmap, vmin=-1, vmax=1)
    ax.set_xticks(range(len(metrics)), metrics, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(metrics)), metrics, fontsize=8)
    for i in range(len(metrics)):
        for j in range(len(metrics)):
            ax.text(j, i, "n/a" if not np.isfinite(tau[i, j]) else f"{tau[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label="Kendall τ between the method rankings")
    ax.set_title("Rank agreement of the metrics" + (f" [{partial}]" if partial else ""))
    files.append(_save(fig, _suite_target(out, "rank_agreement")))
    return {"files": files, "lines": lines}


def _save(fig, target: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=120)
    plt.close(fig)
    return target
