"""Metrics as pure functions: maps and model outputs in, numbers out; no model, no I/O.

One module per family, each citing its source and spelling out its protocol:
`paper` (the paper's perturbation and segmentation protocols), `curves` (insertion / deletion,
MIF / LIF / SRG, AOPC / ABPC), `road` (ROAD with noisy linear imputation), `saco` (SaCo),
`localisation` (pointing game, relevance mass and rank accuracy), `robustness` (infidelity,
max-sensitivity) and `sanity` (cascading model randomisation). The perturbed inputs a metric needs
are built here too (pure functions of images and maps); the runner (`evaluation.suite`) runs their
forwards in shared batches and hands the probabilities back. `METRICS` lists what `tx-bench
evaluate --metric` accepts. Everything the old `evaluation/metrics.py` exported is still importable
from here.
"""
from __future__ import annotations

from dataclasses import dataclass

from .paper import (CURVE_X, PERTURBATION_STEPS, accuracy_curve, average_precision, intersection_union,  # noqa: F401
                    mean_average_precision, mean_iou, perturbation_auc, pixel_accuracy, pixel_counts,
                    removal_counts, threshold_at_mean)


@dataclass(frozen=True)
class MetricSpec:
    """What the suite needs to know about a metric: its family (the module that computes it), whether
    higher is better, whether it needs object masks, whether it applies to text, and its source."""

    name: str
    family: str
    higher_is_better: bool
    needs_masks: bool = False
    text: bool = False
    source: str = ""
    image: bool = True  # False: a text-only metric (ERASER's), left out of the image suite's 'all'


METRICS = {spec.name: spec for spec in (
    MetricSpec("insertion", "curves", True, source="Petsiuk et al. 2018 (RISE)"),
    MetricSpec("deletion", "curves", False, source="Petsiuk et al. 2018 (RISE)"),
    MetricSpec("mif", "curves", False, source="Blücher et al. 2024"),
    MetricSpec("lif", "curves", True, source="Blücher et al. 2024"),
    MetricSpec("srg", "curves", True, source="Blücher et al. 2024"),
    MetricSpec("aopc", "curves", True, source="Samek et al. 2017"),
    MetricSpec("abpc", "curves", True, source="Schulz et al. 2020"),
    MetricSpec("road_morf", "road", False, source="Rong et al. 2022 (ROAD)"),
    MetricSpec("road_lerf", "road", True, source="Rong et al. 2022 (ROAD)"),
    MetricSpec("saco", "saco", True, source="Wu et al. 2024 (SaCo)"),
    MetricSpec("pointing_game", "localisation", True, needs_masks=True, source="Zhang et al. 2016; Arras et al. 2022"),
    MetricSpec("relevance_mass", "localisation", True, needs_masks=True, source="Arras et al. 2022"),
    MetricSpec("relevance_rank", "localisation", True, needs_masks=True, source="Arras et al. 2022"),
    MetricSpec("infidelity", "robustness", False, source="Yeh et al. 2019"),
    MetricSpec("max_sensitivity", "robustness", False, source="Yeh et al. 2019"),
    MetricSpec("randomisation", "sanity", False, source="Adebayo et al. 2018"),
    # text only (`evaluation.text_suite`): ERASER's comprehensiveness / sufficiency AOPC, per document
    MetricSpec("comprehensiveness", "eraser", True, text=True, image=False, source="DeYoung et al. 2020 (ERASER)"),
    MetricSpec("sufficiency", "eraser", False, text=True, image=False, source="DeYoung et al. 2020 (ERASER)"),
)}


def resolve_metrics(text: str) -> list[str]:
    """'all' or a comma list -> metric names in `METRICS` order; an unknown name raises a UserError."""
    from ...errors import UserError

    if text.strip() == "all":
        return [m for m in METRICS if METRICS[m].image]
    names = [m.strip().lower().replace("-", "_") for m in text.split(",") if m.strip()]
    if not names:
        raise UserError("Give a metric with --metric (a name, a comma list, or 'all').")
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise UserError(f"Unknown metric {unknown[0]!r}: choose from {', '.join(METRICS)} (or 'all').")
    return [m for m in METRICS if m in names]
