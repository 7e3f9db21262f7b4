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
           "generic_attention": "generic attention", "random": "random", "ln_stats": "ln_stats",
           "saliency": "saliency", "input_x_gradient": "input × gradient", "integrated_gradients": "integrated gradients",
           "smoothgrad": "SmoothGrad", "legrad": "LeGrad", "attnlrp": "AttnLRP", "cp_lrp": "CP-LRP", "tokentm": "TokenTM",
           "bt_h": "BT-H", "bt_t": "BT-T", "attcat": "AttCAT"}
PAPER_FILE = Path(__file__).resolve().parents[2] / "configs" / "paper.toml"
FORMATS = ("markdown", "csv", "latex", "json")


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


def _number(value, digits: int = 2) -> str:
    value = _value(value)
    return "n/a" if value is None else f"{value:.{digits}f}"


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


def _value(v):
    """A number for the machines: float, or None where there is none (NaN included)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def perturbation_data(store) -> dict:
    """The perturbation table as data: corner, methods, rows of (label, our numbers, the paper's)."""
    config, methods, with_paper, paper, header = _table_frame(store, "perturbation", "AUC (%)")
    rows = []
    for test in ("negative", "positive"):
        if test not in config.get("tests", []):
            continue
        for target in ("pred", "true"):
            if target not in config.get("targets", []):
                continue
            label = f"{test.capitalize()}, {'predicted' if target == 'pred' else 'target'}"
            rows.append({"label": label, "key": f"{test}/{target}",
                         "values": [_value(store.summary(f"{m}/{target}/{test}").get("auc")) for m in methods],
                         "paper": [_value(paper.get(test, {}).get(target, {}).get(m)) for m in methods] if with_paper else None})
    caption = "Perturbation AUC (%): negative, higher is better; positive, lower is better."
    if with_paper:
        caption += " In brackets: the paper's Table 1 (ViT-B/16)."
    caption += _partial_caption(store)
    return {"benchmark": "perturbation", "header": header, "methods": methods, "rows": rows, "caption": caption,
            "digits": 2}


#: the segmentation rows in the order of the paper's Table 2
SEGMENTATION_ROWS = (("pixel_accuracy", "Pixel accuracy"), ("miou", "mIoU"), ("map", "mAP"))


def segmentation_data(store) -> dict:
    _, methods, with_paper, paper, header = _table_frame(store, "segmentation", "Segmentation (%)")
    rows = [{"label": label, "key": key, "values": [_value(store.summary(m).get(key)) for m in methods],
             "paper": [_value(paper.get(key, {}).get(m)) for m in methods] if with_paper else None}
            for key, label in SEGMENTATION_ROWS]
    caption = "ImageNet-Segmentation (%), higher is better."
    if with_paper:
        caption += " In brackets: the paper's Table 2 (ViT-B/16)."
    caption += _partial_caption(store)
    return {"benchmark": "segmentation", "header": header, "methods": methods, "rows": rows, "caption": caption,
            "digits": 2}


def render_table(data: dict, fmt: str = "markdown") -> str:
    """A table from `perturbation_data` / `segmentation_data` (or any dict of that shape) as text;
    a missing number is `n/a`, the paper's number (when there) in brackets."""
    digits = data.get("digits", 2)

    def cell(ours, paper):
        text = _number(ours, digits)
        return f"{text} ({_number(paper, digits)})" if paper is not None else text

    body = []
    for row in data["rows"]:
        papers = row.get("paper") or [None] * len(row["values"])
        body.append([row["label"]] + [cell(v, p) for v, p in zip(row["values"], papers)])
    return format_table(data["header"], body, fmt, data.get("caption", ""))


def perturbation_table(store, fmt: str = "markdown") -> str:
    return render_table(perturbation_data(store), fmt)


def segmentation_table(store, fmt: str = "markdown") -> str:
    return render_table(segmentation_data(store), fmt)


BENCHMARK_UNITS = {"perturbation": "images", "segmentation": "images", "eraser": "documents"}


def header_line(config: dict, n=None, unit: str | None = None) -> str:
    """The one line every benchmark prints when it starts and every report prints over its table:
    benchmark | model | weights | data | N images (or documents)."""
    benchmark = config.get("benchmark") or "n/a"
    unit = unit or BENCHMARK_UNITS.get(benchmark, "examples")
    weights = config.get("weights") or config.get("weights_hash") or "n/a"
    count = "n/a" if n is None else n
    return (f"{benchmark} | model {config.get('model') or 'n/a'} | weights {weights} | "
            f"data {config.get('data') or 'n/a'} | {count} {unit}")


def resuming_line(out, position: int, total=None, unit: str = "images") -> str:
    """The message every benchmark prints when it picks up an unfinished results file."""
    of = f" of {total}" if total is not None else ""
    return f"Resuming {out} at {unit.rstrip('s')} {position}{of}."


def run_description(store) -> str:
    """One line: the header line (what was run, on what, how many examples), then how it went."""
    c = store.config
    group = "clean" if c.get("benchmark") == "perturbation" else "images"
    info = store.summary(group)
    n = info.get("n", store.done(group))
    text = header_line(c, n)
    if info.get("skipped"):
        text += f", {info['skipped']} skipped (unreadable)"
    if "accuracy" in info and info["accuracy"] == info["accuracy"]:
        text += f" | clean accuracy {100 * info['accuracy']:.2f}%"
    text += f" | precision {c.get('precision') or 'n/a'}"
    if c.get("batch_size") is not None:
        sizes = c["batch_size"] if isinstance(c["batch_size"], list) else [c["batch_size"]]
        text += f" | batch size {', '.join(map(str, sizes))}"
    if not store.is_complete:
        text += " | INCOMPLETE run: numbers cover the images done so far"
    return text


#: config keys that may differ between files shown in one table (each file brings its own methods)
MERGE_FREE = ("methods", "batch_size", "save_maps")


class MergedView:
    """Several results files of one benchmark and the same settings (the quick start writes one
    file per method) seen as one store whose methods are all of theirs."""

    def __init__(self, views, paths):
        self._views = list(views)
        self._owner = {}
        for view, path in zip(self._views, paths):
            for method in view.config.get("methods", []):
                if method in self._owner:
                    other = paths[self._views.index(self._owner[method])]
                    raise UserError(f"{method} is in both {other} and {path}: give only one of them to report.")
                self._owner[method] = view
        first = self._views[0]
        self.config = {**first.config, "methods": list(self._owner)}
        self.benchmark = first.benchmark

    def __getattr__(self, name):
        return getattr(self._views[0], name)

    def _view_of(self, group: str):
        return self._owner.get(group.split("/")[0], self._views[0])

    def summary(self, group: str) -> dict:
        return self._view_of(group).summary(group)

    def done(self, group: str) -> int:
        return self._view_of(group).done(group)

    @property
    def is_complete(self) -> bool:
        return all(v.is_complete for v in self._views)

    @property
    def position(self) -> int:
        return min(v.position for v in self._views)

    @property
    def environments(self) -> list:
        from .store import canonical_json

        seen, out = set(), []
        for view in self._views:
            for env in view.environments:
                key = canonical_json(env)
                if key not in seen:
                    seen.add(key)
                    out.append(env)
        return out


def _merge_key(config: dict) -> str:
    from .store import canonical_json

    return canonical_json({k: v for k, v in config.items() if k not in MERGE_FREE})


def report_groups(paths) -> list:
    """[(view, [paths])]: the perturbation and segmentation files given, those of one benchmark and
    the same settings merged into one view (one table), in the order first given."""
    from .store import ResultStore

    groups: dict = {}
    for path in paths:
        store = ResultStore(path)
        if store.benchmark not in ("perturbation", "segmentation"):
            raise UserError(f"{path} holds a {store.benchmark or 'unknown'} benchmark that this report does not know: give a perturbation or segmentation results file.")
        groups.setdefault((store.benchmark, _merge_key(store.config)), []).append((reporting_view(store), Path(path)))
    out = []
    for members in groups.values():
        views, files = [m[0] for m in members], [m[1] for m in members]
        out.append((views[0] if len(views) == 1 else MergedView(views, files), files))
    return out


def table_data(store) -> dict:
    if store.benchmark == "perturbation":
        return perturbation_data(store)
    return segmentation_data(store)


def report_json(store, files) -> dict:
    """One table of a report for machines: numbers as numbers (null where missing), by method name."""
    data = table_data(store)
    methods = data["methods"]
    return {
        "benchmark": data["benchmark"], "files": [str(f) for f in files], "complete": bool(store.is_complete),
        "partial": partial_label(store), "header": run_description(store), "caption": data["caption"],
        "methods": methods, "display_names": {m: DISPLAY.get(m, m) for m in methods},
        "rows": [{"label": r["label"], "key": r["key"], "values": dict(zip(methods, r["values"])),
                  "paper": dict(zip(methods, r["paper"])) if r.get("paper") else None} for r in data["rows"]],
        "paper_note": paper_note(store, data["benchmark"]), "environment": store.environments, "config": store.config,
    }


def report_text(paths, fmt: str = "markdown") -> str:
    """The report of perturbation / segmentation results files as text: one table per benchmark and
    settings (several files of the same run, one per method, become one table). Markdown, CSV (every
    table, a blank line between them, notes as `# ` lines), LaTeX (booktabs, with a caption) or JSON."""
    import json

    if fmt not in FORMATS:
        raise UserError(f"Unknown table format {fmt!r}: choose {', '.join(FORMATS[:-1])} or {FORMATS[-1]}.")
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    groups = report_groups(paths)
    if fmt == "json":
        return json.dumps({"tables": [report_json(view, files) for view, files in groups]}, indent=2, sort_keys=False)
    sections = []
    for view, files in groups:
        table = render_table(table_data(view), fmt)
        notes = notes_under_table(view, view.benchmark, fmt)
        where = f"files: {', '.join(map(str, files))}" if len(files) > 1 else ""
        if fmt == "csv":
            extra = [f"# {run_description(view)}"] + ([f"# {where}"] if where else [])
            sections.append("\n".join([table, *extra, notes]))
            continue
        prefix = "% " if fmt == "latex" else ""
        head = f"{prefix}{run_description(view)}" + (f"\n{prefix}{where}" if where else "")
        if fmt == "latex":
            head += "\n% needs \\usepackage{booktabs}"
        sections.append(f"{head}\n\n{table}\n\n{notes}")
    return "\n\n".join(sections)


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
