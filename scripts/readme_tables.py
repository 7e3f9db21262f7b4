"""Print the README's embedded benchmark tables from the expected-numbers files (never by hand).

    .venv/bin/python scripts/readme_tables.py

Vision: configs/expected/embedded.json (ViT) and embedded_swin.json (Swin), one row per metric,
one column per method, the best of each row in bold. Text: configs/expected/embedded_text.json.
Methods in the registry's order, split into tables of at most `--width` columns.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VISION_ROWS = [("Negative AUC (pred) ↑", "perturbation_auc", "negative/pred", max),
               ("Positive AUC (pred) ↓", "perturbation_auc", "positive/pred", min),
               ("Pixel accuracy ↑", "segmentation", "pixel_accuracy", max),
               ("mIoU ↑", "segmentation", "miou", max),
               ("mAP ↑", "segmentation", "map", max)]
TEXT_ROWS = [("token-F1 @ k=40 ↑", lambda m: m["token_f1_macro"]["40"], max),
             ("IOU-F1 ↑", lambda m: m["iou_f1"], max),
             ("AUPRC ↑", lambda m: m["auprc"], max),
             ("comprehensiveness AOPC ↑", lambda m: m["comprehensiveness_aopc"], max),
             ("sufficiency AOPC ↓", lambda m: m["sufficiency_aopc"], min)]


def _chunks(items, n):
    return [items[i:i + n] for i in range(0, len(items), n)]


def _table(title, methods, rows, value, digits):
    from transexplain.results.tables import DISPLAY

    out = [f"| {title} | " + " | ".join(DISPLAY.get(m, m) for m in methods) + " |",
           "|---|" + "---|" * len(methods)]
    for label, key, best in rows:
        vals = [value(m, key) for m in methods]
        top = best(vals)
        out.append(f"| {label} | " + " | ".join((f"**{v:.{digits}f}**" if v == top else f"{v:.{digits}f}") for v in vals) + " |")
    return "\n".join(out)


def vision(path: Path, title: str, width: int) -> str:
    from transexplain.explainers import method_names

    spec = json.loads(path.read_text())
    methods = [m for m in method_names() if m in spec["methods"]]
    rows = [(label, (kind, key), best) for label, kind, key, best in VISION_ROWS]

    def value(m, kk):
        return spec["methods"][m][kk[0]][kk[1]]

    head = (f"{title}: {spec['perturb_limit']} perturbation images, {spec['seg_limit']} segmentation images, "
            f"clean accuracy {spec['clean_accuracy']:.0f}% (`{path.relative_to(ROOT)}`)")
    # the best of a row is taken over all methods, not per chunk
    tops = {label: best(value(m, (kind, key)) for m in methods) for label, kind, key, best in VISION_ROWS}
    tables = []
    for part in _chunks(methods, width):
        t = _table(title, part, [(label, kk, lambda vals, label=label: tops[label]) for label, kk, _ in rows], value, 1)
        tables.append(t)
    return head + "\n\n" + "\n\n".join(tables)


def text(path: Path, width: int) -> str:
    from transexplain.explainers import method_names

    spec = json.loads(path.read_text())
    methods = [m for m in method_names() if m in spec["methods"]]
    tops = {label: best(fn(spec["methods"][m]) for m in methods) for label, fn, best in TEXT_ROWS}

    def value(m, fn):
        return fn(spec["methods"][m])

    head = f"embedded text model, first {spec['documents']} test reviews (`{path.relative_to(ROOT)}`)"
    tables = [_table("embedded text", part, [(label, fn, lambda vals, label=label: tops[label]) for label, fn, _ in TEXT_ROWS],
                     value, 3) for part in _chunks(methods, width)]
    return head + "\n\n" + "\n\n".join(tables)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=10)
    args = ap.parse_args()
    exp = ROOT / "configs" / "expected"
    for name, title in (("embedded.json", "embedded ViT"), ("embedded_swin.json", "embedded Swin")):
        if (exp / name).exists():
            print(vision(exp / name, title, args.width) + "\n")
    if (exp / "embedded_text.json").exists():
        print(text(exp / "embedded_text.json", args.width))


if __name__ == "__main__":
    main()
