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
