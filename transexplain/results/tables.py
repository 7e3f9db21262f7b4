"""Results as tables in the layout of the paper's Tables 1 and 2 (methods as columns).

Markdown, CSV or LaTeX. The paper's numbers (configs/paper.toml) are printed beside ours only
when the run used the paper's checkpoint (the architecture and timm pretrained tag it names) and
followed its protocol on the full real data set; otherwise one line under the table says why they
are left out (on the embedded default, or another checkpoint, they would invite a comparison that
means nothing). Under every table come the precision and the environment the numbers were
computed in (as `#` comment lines in CSV, `%` comment lines in LaTeX).
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


def paper_mismatches(config: dict, benchmark: str, images: int | None = None, paper: dict | None = None) -> list:
    """Why a run's numbers cannot stand beside the paper's: [] when they can.

    Checked: the model's architecture and its weights (timm's pretrained weights with the paper's
    tag), real data (not the embedded default), the input size and plain resize, no --limit, and,
    when `images` (examples seen, skipped ones included) is given, the full data set's size.
    """
    paper = paper_numbers() if paper is None else paper
    want = paper.get("model", {})
    protocol = paper.get("protocol", {}).get(benchmark, {})
    reasons = []
    pinned = want.get("name", "")
    arch = config.get("architecture") or str(config.get("model") or "").split(".")[0]
    tag = config.get("pretrained_tag")
    if want.get("architecture") and arch != want["architecture"]:
        reasons.append(f"model {config.get('model') or 'not recorded'} is not the paper's {pinned}")
    elif not tag or not str(config.get("model_source", "")).startswith("timm:"):
        weights = config.get("weights") or config.get("weights_hash") or "not recorded"
        reasons.append(f"weights {weights} are not timm's pretrained {pinned}")
    elif want.get("pretrained_tag") and tag != want["pretrained_tag"]:
        reasons.append(f"pretrained tag {tag} is not the paper's {want['pretrained_tag']} ({pinned})")
    if config.get("data_source") == "embedded":
        reasons.append("data is the embedded shapes set, not the paper's")
    size = list(config.get("input_size", []))[-2:]
    wanted_size = list(protocol.get("input_size", [224, 224]))
    if size != wanted_size:
        reasons.append(f"input {'x'.join(map(str, size)) or 'not recorded'}, not {'x'.join(map(str, wanted_size))}")
    if config.get("crop", False):
        reasons.append("center crop, not the paper's plain resize")
    if config.get("limit") is not None:
        reasons.append(f"only the first {config['limit']} images (--limit)")
    elif images is not None and protocol.get("images") and images != protocol["images"]:
        reasons.append(f"{images} images, not the paper's full {protocol['images']}")
    return reasons


def follows_paper_protocol(config: dict, benchmark: str = "perturbation", images: int | None = None) -> bool:
    """The paper's checkpoint on the paper's full real data, 224x224, plain resize (see paper_mismatches)."""
    return not paper_mismatches(config, benchmark, images)


class PartialView:
    """A read-only stand-in for the ResultStore of an unfinished run: every read goes to the store,
    and the summaries are computed from the stored per-image rows with the runners' own `summarise`
    (evaluation.perturbation / evaluation.segmentation) and kept here, never written to the file
    (which another process may still be writing)."""

    def __init__(self, store):
        self._store = store
        self._summaries: dict = {}
        config = store.config
        methods = list(config.get("methods", []))
        if store.benchmark == "perturbation":
            from ..evaluation.perturbation import summarise

            summarise(self, methods, list(config.get("tests", [])), list(config.get("targets", [])))
            for group, summary in self._summaries.items():
                if "curve" in summary and not summary.get("n"):  # no image yet: no number, not 0
                    self._summaries[group] = {**summary, "curve": [], "auc": None}
        elif store.benchmark == "segmentation":
            from ..evaluation.segmentation import summarise

            summarise(self, methods)

    def __getattr__(self, name):
        return getattr(self._store, name)

    def set_summary(self, group: str, summary: dict):
        self._summaries[group] = summary

    def summary(self, group: str) -> dict:
        return self._summaries[group] if group in self._summaries else self._store.summary(group)


def reporting_view(store):
    """What a report reads: the store itself for a finished run; for an unfinished one a
    `PartialView` whose numbers cover the images done so far."""
    return store if store.is_complete else PartialView(store)


def partial_label(store) -> str | None:
    """None for a finished run; else "partial: N images done so far" (N counts unreadable ones too)."""
    if store.is_complete:
        return None
    done = store.position
    limit = store.config.get("limit")
    of = f" of {limit}" if limit is not None else ""
    return f"partial: {done}{of} images done so far (unfinished run)"


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


def images_seen(store) -> int | None:
    """Examples the run went through, unreadable ones included (None when it cannot tell)."""
    group = "clean" if store.benchmark == "perturbation" else "images"
    info = store.summary(group)
    if "n" not in info:
        return None
    return int(info["n"]) + int(info.get("skipped", 0))


def _table_frame(store, benchmark: str, corner: str):
    """What both benchmark tables start from: the stored config, the methods in display order,
    whether the paper's numbers apply (and those numbers), and the header row."""
    config = store.config
    methods = ordered(config.get("methods", []))
    published = paper_numbers()
    with_paper = bool(published) and not paper_mismatches(config, benchmark, images_seen(store), published)
    paper = published.get(benchmark, {}) if with_paper else {}
    partial = partial_label(store)
    if partial:
        corner += f" [{partial}]"
    return config, methods, with_paper, paper, [corner] + [DISPLAY.get(m, m) for m in methods]


def _partial_caption(store) -> str:
    partial = partial_label(store)
    return f" PARTIAL: {partial[len('partial: '):]}." if partial else ""


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
    caption += _partial_caption(store)
    return format_table(header, rows, fmt, caption)


def segmentation_table(store, fmt: str = "markdown") -> str:
    _, methods, with_paper, paper, header = _table_frame(store, "segmentation", "Segmentation (%)")
    rows = []
    for key, label in (("pixel_accuracy", "Pixel accuracy"), ("map", "mAP"), ("miou", "mIoU")):
        rows.append([label] + [_cell(store.summary(m).get(key), paper.get(key, {}).get(m), with_paper) for m in methods])
    caption = "ImageNet-Segmentation (%), higher is better."
    if with_paper:
        caption += " In brackets: the paper's Table 2 (ViT-B/16)."
    caption += _partial_caption(store)
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
    text += f" | precision {c.get('precision') or 'not recorded'}"
    if c.get("batch_size") is not None:
        sizes = c["batch_size"] if isinstance(c["batch_size"], list) else [c["batch_size"]]
        text += f" | batch size {', '.join(map(str, sizes))}"
    if not store.is_complete:
        text += " | INCOMPLETE run: numbers cover the images done so far"
    return text


def report_text(path, fmt: str = "markdown") -> str:
    """The report of a perturbation or segmentation results file as text."""
    from .store import ResultStore

    if fmt not in FORMATS:
        raise UserError(f"Unknown table format {fmt!r}: choose markdown, csv or latex.")
    store = reporting_view(ResultStore(path))
    benchmark = store.benchmark
    if benchmark == "perturbation":
        table = perturbation_table(store, fmt)
    elif benchmark == "segmentation":
        table = segmentation_table(store, fmt)
    else:
        raise UserError(f"{path} holds a {benchmark or 'unknown'} benchmark that this report does not know: give a perturbation or segmentation results file.")
    notes = notes_under_table(store, benchmark, fmt)
    if fmt == "csv":
        return f"{table}\n{notes}"
    prefix = "% " if fmt == "latex" else ""
    return f"{prefix}{run_description(store)}\n\n{table}\n\n{notes}"


def paper_note(store, benchmark: str) -> str | None:
    """The one line saying why the paper's numbers are not beside ours (None when they are, or
    when the paper has no table for this benchmark)."""
    published = paper_numbers()
    if benchmark not in published:
        return None
    reasons = paper_mismatches(store.config, benchmark, images_seen(store), published)
    if not reasons:
        return None
    return "Paper numbers not shown: " + "; ".join(reasons) + "."


def notes_under_table(store, benchmark: str, fmt: str) -> str:
    """The lines printed under a results table: why the paper's numbers are missing (when they
    are), then the environment the numbers were computed in. CSV gets them as `# ` comment lines,
    LaTeX as `% ` comment lines."""
    from .environment import environment_lines

    lines = [line for line in [paper_note(store, benchmark)] if line]
    lines += environment_lines(store.environments)
    prefix = {"csv": "# ", "latex": "% "}.get(fmt, "")
    return "\n".join(prefix + line for line in lines)
