"""Results as tables in the layout of the paper's Tables 1 and 2 (methods as columns).

Markdown, CSV or LaTeX. The paper's numbers (configs/paper.toml) are printed beside ours only
when the run followed the paper's protocol on real data; on the embedded default they would
invite a comparison that means nothing.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import UserError

#: column order of the paper, then the methods the paper does not have
METHOD_ORDER = ("rollout", "raw_attention", "gradcam", "full_lrp", "partial_lrp", "transformer_attribution",
                "generic_attention", "random")
DISPLAY = {"rollout": "rollout", "raw_attention": "raw attention", "gradcam": "GradCAM", "full_lrp": "LRP",
           "partial_lrp": "partial LRP", "transformer_attribution": "Transformer Attribution",
           "generic_attention": "generic attention", "random": "random"}
PAPER_FILE = Path(__file__).resolve().parents[2] / "configs" / "paper.toml"
FORMATS = ("markdown", "csv", "latex")


def paper_numbers(path: Path = PAPER_FILE) -> dict:
    """The published numbers from configs/paper.toml ({} when the file is not there)."""
    import tomllib

    if not path.exists():
        return {}
    with open(path, "rb") as f:
        return tomllib.load(f)


def follows_paper_protocol(config: dict) -> bool:
    """Real data (not the embedded default), 224x224 input, plain resize, the nine standard steps."""
    size = list(config.get("input_size", []))[-2:]
    return (config.get("data_source") != "embedded" and not config.get("crop", False) and size == [224, 224]
            and config.get("limit") is None)


def ordered(methods) -> list:
    known = [m for m in METHOD_ORDER if m in methods]
    return known + sorted(m for m in methods if m not in METHOD_ORDER)


def _number(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def format_table(header: list, rows: list, fmt: str = "markdown", caption: str = "") -> str:
    """Render a header row and body rows (lists of strings) as markdown, CSV or LaTeX."""
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return (f"{caption}\n\n" if caption else "") + "\n".join(lines)
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    if fmt == "latex":
        esc = lambda s: s.replace("_", r"\_").replace("%", r"\%")  # noqa: E731
        lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "c" * (len(header) - 1) + "}", r"\toprule",
                 " & ".join(esc(h) for h in header) + r" \\", r"\midrule"]
        lines += [" & ".join(esc(c) for c in r) + r" \\" for r in rows]
        lines += [r"\bottomrule", r"\end{tabular}"]
        if caption:
            lines.append(r"\caption{" + esc(caption) + "}")
        lines.append(r"\end{table}")
        return "\n".join(lines)
    raise UserError(f"Unknown table format {fmt!r}: choose markdown, csv or latex.")


def _cell(ours, paper, with_paper: bool) -> str:
    if with_paper and paper is not None:
        return f"{_number(ours)} ({_number(paper)})"
    return _number(ours)


def _table_frame(store, benchmark: str, corner: str):
    """What both benchmark tables start from: the stored config, the methods in display order,
    whether the paper's numbers apply (and those numbers), and the header row."""
    config = store.config
    methods = ordered(config.get("methods", []))
    with_paper = follows_paper_protocol(config)
    paper = paper_numbers().get(benchmark, {}) if with_paper else {}
    return config, methods, with_paper, paper, [corner] + [DISPLAY.get(m, m) for m in methods]


def perturbation_table(store, fmt: str = "markdown") -> str:
    config, methods, with_paper, paper, header = _table_frame(store, "perturbation", "AUC (%)")
    rows = []
    for test in ("negative", "positive"):
        if test not in config.get("tests", []):
            continue
        for target in ("pred", "true"):
            if target not in config.get("targets", []):
                continue
            label = f"{test.capitalize()}, {'predicted' if target == 'pred' else 'target'}"
            cells = [_cell(store.summary(f"{m}/{target}/{test}").get("auc"), paper.get(test, {}).get(target, {}).get(m),
                           with_paper) for m in methods]
            rows.append([label] + cells)
    caption = "Perturbation AUC (%): negative, higher is better; positive, lower is better."
    if with_paper:
        caption += " In brackets: the paper's Table 1 (ViT-B/16)."
    return format_table(header, rows, fmt, caption)


def segmentation_table(store, fmt: str = "markdown") -> str:
    _, methods, with_paper, paper, header = _table_frame(store, "segmentation", "Segmentation (%)")
    rows = []
    for key, label in (("pixel_accuracy", "Pixel accuracy"), ("map", "mAP"), ("miou", "mIoU")):
        rows.append([label] + [_cell(store.summary(m).get(key), paper.get(key, {}).get(m), with_paper) for m in methods])
    caption = "ImageNet-Segmentation (%), higher is better."
    if with_paper:
        caption += " In brackets: the paper's Table 2 (ViT-B/16)."
    return format_table(header, rows, fmt, caption)


def run_description(store) -> str:
    """One line: what was run, on what, how many examples, and whether the run finished."""
    c = store.config
    group = "clean" if c.get("benchmark") == "perturbation" else "images"
    info = store.summary(group)
    n = info.get("n", store.done(group))
    text = f"{c.get('benchmark')} | model {c.get('model')} ({c.get('weights_hash')}) | data {c.get('data')} | {n} images"
    if info.get("skipped"):
        text += f", {info['skipped']} skipped (unreadable)"
    if "accuracy" in info and info["accuracy"] == info["accuracy"]:
        text += f" | clean accuracy {100 * info['accuracy']:.2f}%"
    if not store.is_complete:
        text += " | INCOMPLETE run: numbers cover the images done so far"
    return text


def report_text(path, fmt: str = "markdown") -> str:
    """The report of a perturbation or segmentation results file as text."""
    from .store import ResultStore

    if fmt not in FORMATS:
        raise UserError(f"Unknown table format {fmt!r}: choose markdown, csv or latex.")
    store = ResultStore(path)
    benchmark = store.benchmark
    if benchmark == "perturbation":
        table = perturbation_table(store, fmt)
    elif benchmark == "segmentation":
        table = segmentation_table(store, fmt)
    else:
        raise UserError(f"{path} holds a {benchmark or 'unknown'} benchmark that this report does not know: give a perturbation or segmentation results file.")
    if fmt == "csv":
        return table
    prefix = "% " if fmt == "latex" else ""
    return f"{prefix}{run_description(store)}\n\n{table}"
