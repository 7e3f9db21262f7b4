"""The metric suite's report: the method x metric table (best per column marked, NaN counts shown)
and the rank-agreement table (Kendall τ between the method rankings of every pair of metrics), as
markdown, CSV or LaTeX, computed from the per-image values in the results file."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from .tables import format_table, notes_under_table, run_description


def _cell(summary: dict, best: bool, fmt: str) -> str:
    mean = summary.get("mean")
    if mean is None or not np.isfinite(mean):
        text = "n/a"
    else:
        text = f"{mean:.4g}"
        if best:
            text = {"markdown": f"**{text}**", "latex": r"\textbf{" + text + "}", "csv": text + "*"}[fmt]
    if summary.get("nan"):
        text += f" ({summary['nan']} NaN)"
    return text


def best_per_metric(table: dict, methods, metrics) -> dict:
    """{metric: {methods with the best finite mean}} (the largest, or the smallest where lower is better)."""
    from ..evaluation.metrics import METRICS

    best = {}
    for m in metrics:
        vals = {meth: table[meth][m]["mean"] for meth in methods if np.isfinite(table[meth][m]["mean"])}
        if vals:
            target = (max if METRICS[m].higher_is_better else min)(vals.values())
            best[m] = {meth for meth, v in vals.items() if v == target}
    return best


def suite_tables(store, fmt: str = "markdown") -> str:
    """Both tables of one suite results file."""
    from ..evaluation.metrics import METRICS
    from ..evaluation.suite import rank_agreement, summarise

    if fmt not in ("markdown", "csv", "latex"):
        raise UserError(f"Unknown table format {fmt!r}: choose markdown, csv or latex.")
    methods = list(store.config.get("methods", []))
    metrics = list(store.config.get("metrics", []))
    table = summarise(store, methods, metrics)
    arrow = {m: "↑" if METRICS[m].higher_is_better else "↓" for m in metrics}
    if fmt == "latex":
        arrow = {m: r"$\uparrow$" if METRICS[m].higher_is_better else r"$\downarrow$" for m in metrics}
    best = best_per_metric(table, methods, metrics)
    header = ["method"] + [f"{m} {arrow[m]}" for m in metrics]
    rows = [[meth] + [_cell(table[meth][m], meth in best.get(m, ()), fmt) for m in metrics] for meth in methods]
    mark = {"markdown": "bold", "latex": "bold", "csv": "marked *"}[fmt]
    caption = (f"Metric suite: mean per image over the images where the metric is defined; best per column {mark}; "
               "(k NaN): images where it is undefined (constant map, empty mask), counted, not averaged.")
    first = format_table(header, rows, fmt, caption)
    tau = rank_agreement(table, metrics)
    tau_rows = [[m] + ["n/a" if not np.isfinite(t) else f"{t:.2f}" for t in tau[i]] for i, m in enumerate(metrics)]
    second = format_table(["Kendall τ" if fmt != "latex" else "Kendall tau"] + metrics, tau_rows, fmt,
                          "Rank agreement: Kendall τ between the method rankings of every pair of metrics "
                          "(each oriented so that better ranks first; n/a with fewer than two methods).")
    sep = "\n\n" if fmt != "csv" else "\n\n"
    return first + sep + second


def suite_report_text(path, fmt: str = "markdown") -> str:
    """The report of one `tx-bench evaluate` results file, with its header and notes."""
    from . import ResultStore
    from .tables import reporting_view

    store = reporting_view(ResultStore(Path(path)))
    prefix = {"csv": "# ", "latex": "% "}.get(fmt, "")
    head = prefix + run_description(store)
    body = suite_tables(store, fmt)
    notes = notes_under_table(store, "suite", fmt)
    return f"{head}\n\n{body}\n\n{notes}".rstrip("\n")


def suite_report_json(path) -> dict:
    """The report of one suite results file for machines: numbers as numbers (null for NaN)."""
    from ..evaluation.metrics import METRICS
    from ..evaluation.suite import rank_agreement, summarise
    from . import ResultStore
    from .tables import partial_label, reporting_view

    def num(v):
        return float(v) if v is not None and np.isfinite(v) else None

    store = reporting_view(ResultStore(Path(path)))
    methods = list(store.config.get("methods", []))
    metrics = list(store.config.get("metrics", []))
    table = summarise(store, methods, metrics)
    best = best_per_metric(table, methods, metrics)
    tau = rank_agreement(table, metrics)
    return {
        "benchmark": "suite", "files": [str(path)], "complete": bool(store.is_complete), "partial": partial_label(store),
        "header": run_description(store), "methods": methods, "metrics": metrics,
        "higher_is_better": {m: bool(METRICS[m].higher_is_better) for m in metrics},
        "values": {meth: {m: {"mean": num(table[meth][m]["mean"]), "n": table[meth][m]["n"], "nan": table[meth][m]["nan"]}
                          for m in metrics} for meth in methods},
        "best": {m: [meth for meth in methods if meth in chosen] for m, chosen in best.items()}, "rank_agreement": [[num(t) for t in row] for row in tau],
        "environment": store.environments, "config": store.config,
    }
