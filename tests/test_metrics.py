"""Benchmark metrics against hand-worked values, brute-force loops and scikit-learn; perturbation masks."""
import numpy as np
import pytest
import torch

from transexplain.evaluation.metrics import (CURVE_X, accuracy_curve, average_precision, intersection_union, mean_average_precision,
                                             mean_iou, perturbation_auc, pixel_accuracy, pixel_counts, removal_counts,
                                             threshold_at_mean)
from transexplain.evaluation.perturbation import perturbed_copies, removal_masks


# ---------------------------------------------------------------- perturbation AUC
def test_auc_of_a_constant_curve_is_90_times_the_accuracy():
    # a flat curve at 1.0 over x in [0, 0.9] has area 0.9 -> 90 %
    assert perturbation_auc([1.0] * 10) == pytest.approx(90.0)
    assert perturbation_auc([0.5] * 10) == pytest.approx(45.0)


def test_auc_hand_trapezoid():
    curve = [0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.2, 0.1, 0.1, 0.0]
    # trapezoids of width 0.1: 0.1 * (sum of neighbouring means)
    by_hand = 0.1 * ((0.8 + 0.6) / 2 + (0.6 + 0.5) / 2 + (0.5 + 0.4) / 2 + (0.4 + 0.3) / 2 + (0.3 + 0.2) / 2
                     + (0.2 + 0.2) / 2 + (0.2 + 0.1) / 2 + (0.1 + 0.1) / 2 + (0.1 + 0.0) / 2)
    assert perturbation_auc(curve) == pytest.approx(100 * by_hand)
    assert perturbation_auc(curve) == pytest.approx(100 * np.trapezoid(curve, x=CURVE_X))


def test_auc_rejects_a_curve_of_the_wrong_length():
    with pytest.raises(ValueError):
        perturbation_auc([1.0] * 9)


def test_accuracy_curve_is_the_column_mean():
    hits = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=bool)
    assert accuracy_curve(hits).tolist() == [0.75, 0.5, 0.25]


def test_removal_counts_truncate():
    assert removal_counts(224 * 224) == [int(50176 * p) for p in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)]
    assert removal_counts(10) == [1, 2, 3, 4, 5, 6, 7, 8, 9]


# ---------------------------------------------------------------- perturbation masks
def test_masks_remove_exactly_int_hw_p_pixels():
    maps = torch.rand(3, 13, 7)
    for positive in (True, False):
        masks = removal_masks(maps, positive)
        assert masks.shape == (3, 9, 13, 7)
        assert masks.reshape(3, 9, -1).sum(-1).tolist() == [removal_counts(91)] * 3


def test_positive_removes_the_most_relevant_and_negative_the_least():
    maps = torch.arange(16, dtype=torch.float32).view(1, 4, 4)  # pixel i has relevance i
    pos, neg = removal_masks(maps, True)[0], removal_masks(maps, False)[0]
    for k, n in enumerate(removal_counts(16)):
        removed_pos = set(torch.nonzero(pos[k].reshape(-1)).squeeze(1).tolist())
        removed_neg = set(torch.nonzero(neg[k].reshape(-1)).squeeze(1).tolist())
        assert removed_pos == set(range(16 - n, 16))
        assert removed_neg == set(range(n))


def test_steps_are_cumulative():
    masks = removal_masks(torch.rand(2, 8, 8), True)
    assert bool((masks[:, 1:] >= masks[:, :-1]).all())


def test_ties_are_broken_by_increasing_flat_index_in_both_tests():
    maps = torch.zeros(1, 2, 5)  # all tied: the lower flat index goes first
    maps[0, 1, 4] = 1.0  # one distinct maximum at flat index 9
    pos = removal_masks(maps, True)[0].reshape(9, -1)
    neg = removal_masks(maps, False)[0].reshape(9, -1)
    # positive: index 9 first, then 0, 1, 2, ... ; negative: 0, 1, 2, ... (9 last)
    assert torch.nonzero(pos[1]).squeeze(1).tolist() == [0, 9]
    assert torch.nonzero(pos[2]).squeeze(1).tolist() == [0, 1, 9]
    assert torch.nonzero(neg[2]).squeeze(1).tolist() == [0, 1, 2]


def test_perturbed_copies_fill_removed_pixels_only():
    x = torch.randn(2, 3, 4, 4)
    masks = removal_masks(torch.rand(2, 4, 4), True)
    fill = torch.tensor([-1.0, -2.0, -3.0]).view(3, 1, 1)
    copies = perturbed_copies(x, masks, fill).view(2, 9, 3, 4, 4)
    for b in range(2):
        for k in range(9):
            m = masks[b, k]
            for c in range(3):
                assert torch.all(copies[b, k, c][m] == fill[c, 0, 0])
                assert torch.equal(copies[b, k, c][~m], x[b, c][~m])


# ---------------------------------------------------------------- segmentation
def _brute_force(maps, masks):
    """Pixel by pixel, the way one would count on paper."""
    correct = labeled = 0
    inter, union = [0, 0], [0, 0]
    for m, t in zip(maps, masks):
        thr = sum(sum(row) for row in m) / (len(m) * len(m[0]))
        for i in range(len(m)):
            for j in range(len(m[0])):
                p = 1 if m[i][j] > thr else 0
                labeled += 1
                correct += int(p == t[i][j])
                for c in (0, 1):
                    inter[c] += int(p == c and t[i][j] == c)
                    union[c] += int(p == c or t[i][j] == c)
    return 100 * correct / labeled, 100 * (inter[0] / union[0] + inter[1] / union[1]) / 2


def test_threshold_at_mean_by_hand():
    m = np.array([[0.0, 0.2], [0.6, 1.0]])  # mean 0.45
    assert threshold_at_mean(m).tolist() == [[False, False], [True, True]]


def test_pixel_accuracy_and_miou_match_a_brute_force_loop():
    rng = np.random.default_rng(1)
    maps = rng.random((4, 6, 5))
    masks = (rng.random((4, 6, 5)) > 0.6).astype(np.uint8)
    pred = threshold_at_mean(maps)
    correct, labeled = pixel_counts(pred, masks)
    inter, union = intersection_union(pred, masks)
    acc, miou = _brute_force(maps.tolist(), masks.tolist())
    assert pixel_accuracy(correct, labeled) == pytest.approx(acc)
    assert mean_iou(inter, union) == pytest.approx(miou)


def test_dataset_level_means_are_ratios_of_sums_not_means_of_ratios():
    correct, labeled = np.array([1, 9]), np.array([2, 10])
    assert pixel_accuracy(correct, labeled) == pytest.approx(100 * 10 / 12)
    inter = np.array([[1, 0], [3, 4]])
    union = np.array([[2, 1], [3, 5]])
    assert mean_iou(inter, union) == pytest.approx(100 * (4 / 5 + 4 / 6) / 2)


def test_miou_by_hand_on_one_image():
    pred = np.array([[1, 1], [0, 0]])
    mask = np.array([[1, 0], [0, 0]])
    inter, union = intersection_union(pred, mask)
    # background: pred {2,3}, truth {1,2,3} -> 2/3; foreground: pred {0,1}, truth {0} -> 1/2
    assert inter.tolist() == [[2, 1]] and union.tolist() == [[3, 2]]
    assert mean_iou(inter, union) == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)


def test_unlabeled_target_pixels_are_ignored():
    pred = np.array([[1, 0, 1]])
    mask = np.array([[1, 255, 0]])
    correct, labeled = pixel_counts(pred, mask)
    assert correct.tolist() == [1] and labeled.tolist() == [2]


def test_average_precision_matches_sklearn_on_the_two_channel_scores():
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(2)
    m = rng.random((7, 6))
    t = (rng.random((7, 6)) > 0.5).astype(np.uint8)
    scores = np.stack([1 - m, m]).reshape(-1)
    truth = np.stack([1 - t, t]).reshape(-1)
    assert average_precision(m, t) == pytest.approx(average_precision_score(truth, scores))


def test_average_precision_of_a_perfect_map_is_one():
    t = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    assert average_precision(t.astype(float), t) == pytest.approx(1.0)


def test_average_precision_by_hand():
    # map (0.9, 0.2), mask (1, 0): scores [0.1, 0.8, 0.9, 0.2] for truths [0, 1, 1, 0];
    # ranked 0.9 (1), 0.8 (1), 0.2 (0), 0.1 (0): both positives first -> AP = 1
    assert average_precision(np.array([[0.9, 0.2]]), np.array([[1, 0]])) == pytest.approx(1.0)
    # map (0.3, 0.6), mask (1, 0): scores [0.7, 0.4, 0.3, 0.6] for truths [0, 1, 1, 0]
    # ranked 0.7 (0), 0.6 (0), 0.4 (1), 0.3 (1): precision at the hits 1/3, 2/4 -> AP = (1/3 + 1/2)/2
    assert average_precision(np.array([[0.3, 0.6]]), np.array([[1, 0]])) == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_average_precision_of_a_constant_map_is_the_reference_value_by_hand():
    # mask: 1 foreground, 3 background pixels. The reference min-max normalises a constant map to
    # NaN and sets both channels to 0: the 8 pooled scores all tie, 4 of them positive, so there is
    # one threshold with P = 4/8 at R = 1 and AP = 1/2, whatever the constant.
    mask = np.array([[1, 0], [0, 0]])
    for value in (0.0, 0.25, 1.0):
        assert average_precision(np.full((2, 2), value), mask) == 0.5
    # (before: a zero map scored [1 - 0, 0] = [1, 0]; the four background-channel scores 1 hold the
    # three background positives, P = 3/4 at R = 3/4, then P = 4/8 at R = 1:
    # AP = 3/4 * 3/4 + 1/4 * 1/2 = 11/16 = f_bg^2 + (1 - f_bg)/2 with f_bg = 3/4)


def test_miou_of_a_class_absent_from_the_set_counts_zero_or_is_skipped():
    inter, union = np.array([[0, 3]]), np.array([[0, 4]])  # no background anywhere
    assert mean_iou(inter, union) == pytest.approx(100 * (0 + 3 / 4) / 2)  # the reference: counts 0
    assert mean_iou(inter, union, absent="skip") == pytest.approx(100 * 3 / 4)  # ours: left out
    with pytest.raises(ValueError):
        mean_iou(inter, union, absent="other")


def test_map_is_the_mean_of_per_image_aps_in_percent():
    assert mean_average_precision([0.5, 1.0]) == pytest.approx(75.0)


# ---------------------------------------------------------------- the runner's shortcuts
def test_runner_shortcuts_equal_direct_computation(tmp_path):
    """target 'true' reuses the 'pred' work where pred == label; batch size must not matter."""
    from test_vision_cli import make_checkpoint, make_image_folder

    from transexplain.data.imagenet import ImageFolderDataset, Preprocess
    from transexplain.evaluation.perturbation import run_perturbation
    from transexplain.models.loading import load_model
    from transexplain.results import ResultStore

    loaded = load_model(str(make_checkpoint(tmp_path / "ckpt")))
    ds = ImageFolderDataset(make_image_folder(tmp_path / "imgs", per_class=3), Preprocess((32, 32), loaded.mean, loaded.std))
    methods = ["transformer_attribution", "rollout"]
    both = ResultStore(tmp_path / "both.h5", {"benchmark": "perturbation"})
    run_perturbation(loaded, ds, both, methods, targets=("pred", "true"), batch_size=5, quiet=True)
    alone = ResultStore(tmp_path / "alone.h5", {"benchmark": "perturbation"})
    run_perturbation(loaded, ds, alone, methods, targets=("true",), batch_size=12, quiet=True)
    pred, label = both.read("clean", "pred"), both.read("clean", "label")
    assert (pred != label).any() and (pred == label).any()  # both branches of the shortcut are used
    for m in methods:
        for test in ("positive", "negative"):
            assert np.array_equal(both.read(f"{m}/true/{test}", "hits"), alone.read(f"{m}/true/{test}", "hits"))
            assert both.summary(f"{m}/true/{test}")["auc"] == alone.summary(f"{m}/true/{test}")["auc"]


def test_rankings_ignore_last_bit_differences_of_exact_ties():
    """A coarse grid upsampled has many values equal in exact arithmetic; each CPU kernel set rounds
    them differently in the last bits (measured 1.1e-15 on the embedded Swin). Every ranking must give
    the same order for the exact map and for the map with such noise: ties by flat index."""
    from transexplain.evaluation.metrics._common import ORDER_BITS, ordering_values, removal_rank
    from transexplain.evaluation.metrics.localisation import pointing_game
    from transexplain.evaluation.metrics.sanity import spearman

    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 5, (3, 4, 4), generator=g).to(torch.float64) / 7  # 5 levels: many exact ties
    exact = coarse.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (3, 32, 32)
    noisy = exact * (1 + 4e-16 * torch.randn(exact.shape, generator=g, dtype=torch.float64))
    assert (noisy != exact).any()  # the noise does reorder a plain sort
    assert not torch.equal(torch.argsort(exact.reshape(3, -1), dim=1, stable=True),
                           torch.argsort(noisy.reshape(3, -1), dim=1, stable=True))
    for most_first in (True, False):
        assert torch.equal(removal_rank(exact, most_first), removal_rank(noisy, most_first))
    for positive in (True, False):
        assert torch.equal(removal_masks(exact, positive), removal_masks(noisy, positive))
    # ties broken by flat index: the first removed pixel is the lowest index holding the maximum
    first = removal_rank(exact, True).reshape(3, -1).argmin(1)
    flat = exact.reshape(3, -1)
    assert torch.equal(first, (flat == flat.amax(1, keepdim=True)).to(torch.int64).argmax(1))
    masks = torch.zeros(3, 32, 32)
    masks[:, :8] = 1
    assert np.array_equal(pointing_game(exact, masks), pointing_game(noisy, masks))
    assert np.array_equal(spearman(exact, exact), spearman(noisy, exact))
    # genuine differences above 2**-ORDER_BITS of the range still order
    v = torch.tensor([[0.0, 1.0, 0.5, 0.5 + 2.0 ** (-ORDER_BITS + 2)]], dtype=torch.float64)
    keys = ordering_values(v)
    assert keys[0, 3] > keys[0, 2] and keys[0, 1] == 2.0 ** ORDER_BITS and keys[0, 0] == 0
