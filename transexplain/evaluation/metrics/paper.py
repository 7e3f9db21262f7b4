"""The paper's two protocols as pure functions on arrays: no model, no I/O.

Perturbation (Chefer et al. 2021, Sec. 4): accuracy after removing a growing fraction of pixels,
summarised by the area under that curve. Segmentation (ImageNet-Segmentation): a relevance map
thresholded at its mean against a foreground mask; pixel accuracy and mIoU are dataset-level
ratios of sums, mAP is a mean of per-image average precisions.
"""
from __future__ import annotations

import numpy as np

#: removal fractions of the perturbation test (the clean image, fraction 0, comes first in a curve)
PERTURBATION_STEPS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: the x-axis of a perturbation curve: 0 (clean) then the nine steps
CURVE_X = (0.0,) + PERTURBATION_STEPS


def removal_counts(num_pixels: int, steps=PERTURBATION_STEPS) -> list[int]:
    """Pixels removed at each step: ``int(num_pixels * p)`` (truncation, as the paper does)."""
    return [int(num_pixels * p) for p in steps]


def accuracy_curve(hits) -> np.ndarray:
    """Accuracy at each point of a perturbation curve.

    hits: (N, K) booleans, ``hits[i, k]`` = example i is classified correctly at point k.
    Returns the (K,) column means, ``acc_k = (1/N) * sum_i hits[i, k]`` (zeros when N = 0).
    """
    hits = np.asarray(hits, dtype=np.float64)
    if hits.shape[0] == 0:
        return np.zeros(hits.shape[1] if hits.ndim == 2 else len(CURVE_X))
    return hits.mean(axis=0)


def perturbation_auc(curve, x=CURVE_X) -> float:
    """Area under an accuracy curve, in percent.

    ``AUC = 100 * sum_{k=1}^{K-1} (x_k - x_{k-1}) * (acc_k + acc_{k-1}) / 2`` (the trapezoid rule),
    with x = (0, 0.1, ..., 0.9) and acc_0 the clean accuracy, so the maximum is 90.
    curve: accuracies in [0, 1], one per x.
    """
    curve = np.asarray(curve, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    if curve.shape != x.shape:
        raise ValueError(f"a curve of {curve.shape[0]} points needs {curve.shape[0]} x values, got {x.shape[0]}")
    return float(100.0 * np.sum((x[1:] - x[:-1]) * (curve[1:] + curve[:-1]) / 2.0))


def threshold_at_mean(maps) -> np.ndarray:
    """Foreground prediction per image: ``map > mean(map)`` (maps: (B, H, W) or (H, W))."""
    maps = np.asarray(maps, dtype=np.float64)
    axes = tuple(range(maps.ndim - 2, maps.ndim))
    return maps > maps.mean(axis=axes, keepdims=True)


def pixel_counts(predicted, target):
    """Per-image correct and labeled pixel counts.

    predicted, target: (B, H, W) (or (H, W)) arrays of class ids in {0, 1} (target values outside
    {0, 1} are unlabeled and ignored). Returns ``(correct, labeled)``, each (B,) int64:
    ``correct_i = #{p : target_i(p) in {0,1} and predicted_i(p) == target_i(p)}``,
    ``labeled_i = #{p : target_i(p) in {0,1}}``.
    """
    predicted = np.asarray(predicted).astype(np.int64)
    target = np.asarray(target).astype(np.int64)
    if predicted.ndim == 2:
        predicted, target = predicted[None], target[None]
    valid = (target == 0) | (target == 1)
    correct = ((predicted == target) & valid).reshape(len(target), -1).sum(1)
    labeled = valid.reshape(len(target), -1).sum(1)
    return correct.astype(np.int64), labeled.astype(np.int64)


def intersection_union(predicted, target, num_classes: int = 2):
    """Per-image, per-class intersection and union pixel counts.

    Returns ``(inter, union)``, each (B, num_classes) int64, with
    ``inter[i, c] = #{p : predicted_i(p) == c and target_i(p) == c}`` and
    ``union[i, c] = #{p : target_i(p) in classes and (predicted_i(p) == c or target_i(p) == c)}``.
    Pixels whose target is outside ``0..num_classes-1`` count in neither.
    """
    predicted = np.asarray(predicted).astype(np.int64)
    target = np.asarray(target).astype(np.int64)
    if predicted.ndim == 2:
        predicted, target = predicted[None], target[None]
    valid = (target >= 0) & (target < num_classes)
    b = len(target)
    inter = np.zeros((b, num_classes), dtype=np.int64)
    union = np.zeros((b, num_classes), dtype=np.int64)
    for c in range(num_classes):
        p, t = (predicted == c) & valid, (target == c) & valid
        inter[:, c] = (p & t).reshape(b, -1).sum(1)
        union[:, c] = (p | t).reshape(b, -1).sum(1)
    return inter, union


def average_precision(relevance, mask) -> float:
    """Average precision of one image's map as a two-channel segmentation score.

    Scores ``[1 - map, map]`` and targets one-hot ``[mask == 0, mask == 1]`` are flattened and
    pooled (both channels together) and given to ``sklearn.metrics.average_precision_score``:
    ``AP = sum_n (R_n - R_{n-1}) P_n`` over decreasing score thresholds.
    relevance: (H, W) in [0, 1]; mask: (H, W) in {0, 1}.

    A constant map scores as the reference's does: its min-max normalisation divides 0 by 0, the
    NaN is set to 0 on both channels, so every score ties and AP = (positives) / (scores) = 0.5
    when every pixel is labeled (not the reward an all-zero map would get from ``[1, 0]`` scores).
    """
    from sklearn.metrics import average_precision_score

    relevance = np.asarray(relevance, dtype=np.float64)
    mask = np.asarray(mask)
    if relevance.size and relevance.max() == relevance.min():
        fg_scores = bg_scores = np.zeros(relevance.size)
    else:
        bg_scores, fg_scores = (1.0 - relevance).reshape(-1), relevance.reshape(-1)
    scores = np.concatenate([bg_scores, fg_scores])
    truth = np.concatenate([(mask == 0).reshape(-1), (mask == 1).reshape(-1)]).astype(np.int64)
    return float(average_precision_score(truth, scores))


def pixel_accuracy(correct, labeled) -> float:
    """Dataset-level pixel accuracy in percent: ``100 * sum_i correct_i / sum_i labeled_i``."""
    total = float(np.sum(labeled))
    return 100.0 * float(np.sum(correct)) / total if total > 0 else float("nan")


def mean_iou(inter, union, absent: str = "zero") -> float:
    """Dataset-level mIoU in percent: ``100 * mean_c (sum_i inter[i, c] / sum_i union[i, c])``.

    absent: what a class with an empty union over the whole evaluated set counts.
    "zero" (default, the reference's ``inter / (eps + union)``): it counts 0 in the mean;
    "skip" (our corrected variant): it is left out of the mean (NaN when every class is absent).
    """
    if absent not in ("zero", "skip"):
        raise ValueError(f"absent must be 'zero' or 'skip', got {absent!r}")
    inter = np.asarray(inter, dtype=np.float64).reshape(-1, np.shape(inter)[-1])
    union = np.asarray(union, dtype=np.float64).reshape(-1, np.shape(union)[-1])
    i, u = inter.sum(0), union.sum(0)
    keep = u > 0
    if absent == "zero":
        return 100.0 * float(np.mean(np.where(keep, i / np.where(keep, u, 1.0), 0.0))) if u.size else float("nan")
    return 100.0 * float(np.mean(i[keep] / u[keep])) if keep.any() else float("nan")


def mean_average_precision(aps) -> float:
    """mAP in percent: ``100 * mean_i AP_i`` over images."""
    aps = np.asarray(aps, dtype=np.float64)
    return 100.0 * float(aps.mean()) if aps.size else float("nan")
