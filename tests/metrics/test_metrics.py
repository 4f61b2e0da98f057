"""cnc_ad.metrics against scikit-learn, a dense-threshold AUPRO reference, and its own streaming mode."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from cnc_ad.metrics import (
    IMAGE_KEYS,
    METRIC_KEYS,
    PIXEL_KEYS,
    MetricAccumulator,
    ScoreRangeWarning,
    UndefinedMetricWarning,
    aupro,
    compute_metrics,
    f1_max_threshold,
    mean_metrics,
    pr_curve_points,
    pro_curve_points,
    roc_curve_points,
    undefined_categories,
)

EXAMPLES = settings(max_examples=60, deadline=None)
IMAGE_ONLY = pytest.mark.filterwarnings("ignore:pixel_auroc, pixel_ap, pixel_f1_max, pixel_aupro undefined")


# ---------------------------------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------------------------------


def sklearn_metrics(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    precision, recall, _ = precision_recall_curve(labels, scores)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(precision), where=denominator > 0)
    return {
        "auroc": roc_auc_score(labels, scores),
        "ap": average_precision_score(labels, scores),
        "f1_max": float(f1.max()),
    }


def reference_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """Plain MVTec AD AUPRO: a threshold at every distinct score, 8-connected regions, slow."""
    regions = []
    for i, mask in enumerate(masks):
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labels == k) for k in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fprs.append((predicted & normal).sum() / normal.sum())
        pros.append(np.mean([predicted[i][region].mean() for i, region in regions]))
    x, y = np.array([*fprs, 1.0]), np.array([*pros, 1.0])
    inside = int(np.sum(x <= max_fpr))
    area = float(np.sum((x[1:inside] - x[: inside - 1]) * (y[1:inside] + y[: inside - 1]) / 2))
    if inside < x.size and x[inside - 1] < max_fpr:
        y_end = y[inside - 1] + (y[inside] - y[inside - 1]) * (max_fpr - x[inside - 1]) / (x[inside] - x[inside - 1])
        area += (max_fpr - x[inside - 1]) * (y[inside - 1] + y_end) / 2
    return area / max_fpr


def blob_data(n: int = 40, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Realistic small test set: smooth noise maps in [0, 2], blob defects in 70% of the images."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    maps = np.empty((n, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    labels = rng.random(n) < 0.7
    for i in range(n):
        noise = ndimage.gaussian_filter(rng.normal(size=(size, size)), 3) * 0.6
        if labels[i]:
            for _ in range(rng.integers(1, 4)):
                cy, cx = rng.integers(size // 8, size - size // 8, 2)
                a, b = rng.uniform(2, 10, 2)
                warp = ndimage.gaussian_filter(rng.normal(size=(size, size)), 2)
                masks[i] |= ((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2 < 1 + 0.8 * warp
        bump = ndimage.gaussian_filter(masks[i].astype(np.float64), 2) * rng.uniform(0.3, 1.0)
        maps[i] = np.clip(0.3 + 0.1 * noise + bump, 0, 2)
    scores = maps.reshape(n, -1).max(axis=1)
    return scores, labels.astype(np.int64), maps, masks


@st.composite
def binary_problems(draw: st.DrawFn, max_size: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """Scores with many ties (small integers), or arbitrary floats (float32 or float64); both labels present."""
    n = draw(st.integers(2, max_size))
    if draw(st.booleans()):
        scores = draw(hnp.arrays(np.int64, n, elements=st.integers(0, 4))).astype(np.float64)
    else:
        dtype = draw(st.sampled_from([np.float32, np.float64]))
        scores = draw(hnp.arrays(dtype, n, elements=st.floats(-1e3, 1e3, width=np.dtype(dtype).itemsize * 8)))
    labels = draw(hnp.arrays(np.bool_, n))
    first, second = draw(st.permutations(range(n)))[:2]
    labels[first], labels[second] = True, False
    return scores, labels


@st.composite
def map_problems(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) maps with ties and masks with several regions, at least one anomalous and one normal pixel."""
    n, h, w = draw(st.integers(1, 3)), draw(st.integers(2, 8)), draw(st.integers(2, 8))
    levels = draw(st.integers(2, 50))
    maps = draw(hnp.arrays(np.int64, (n, h, w), elements=st.integers(0, levels))).astype(np.float32) / levels
    masks = draw(hnp.arrays(np.bool_, (n, h, w)))
    masks.flat[0], masks.flat[-1] = True, False
    return maps, masks


# ---------------------------------------------------------------------------------------------------------------------
# equality with scikit-learn
# ---------------------------------------------------------------------------------------------------------------------


@IMAGE_ONLY
@EXAMPLES
@given(binary_problems())
def test_image_metrics_equal_sklearn(problem: tuple[np.ndarray, np.ndarray]) -> None:
    scores, labels = problem
    ours = compute_metrics(scores, labels.astype(int))
    expected = sklearn_metrics(scores, labels)
    assert ours["image_auroc"] == pytest.approx(expected["auroc"], abs=1e-6)
    assert ours["image_ap"] == pytest.approx(expected["ap"], abs=1e-6)
    assert ours["image_f1_max"] == pytest.approx(expected["f1_max"], abs=1e-6)


@EXAMPLES
@given(map_problems())
def test_pixel_metrics_equal_sklearn(problem: tuple[np.ndarray, np.ndarray]) -> None:
    maps, masks = problem
    n = maps.shape[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # a single image has no normal/anomalous pair
        ours = compute_metrics(np.arange(n, dtype=float), np.arange(n) % 2, maps, masks)
    expected = sklearn_metrics(maps.ravel(), masks.ravel())
    assert ours["pixel_auroc"] == pytest.approx(expected["auroc"], abs=1e-6)
    assert ours["pixel_ap"] == pytest.approx(expected["ap"], abs=1e-6)
    assert ours["pixel_f1_max"] == pytest.approx(expected["f1_max"], abs=1e-6)


@EXAMPLES
@given(binary_problems())
def test_f1_max_threshold_reaches_the_f1(problem: tuple[np.ndarray, np.ndarray]) -> None:
    scores, labels = problem
    f1, threshold = f1_max_threshold(scores, labels)
    predicted = scores >= threshold
    tp = np.sum(predicted & labels)
    assert f1 == pytest.approx(2 * tp / (predicted.sum() + labels.sum()), abs=1e-9)
    assert f1 == pytest.approx(sklearn_metrics(scores, labels)["f1_max"], abs=1e-6)


@IMAGE_ONLY
@pytest.mark.parametrize(
    ("scores", "labels"),
    [
        ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]),  # constant scores
        ([0.1, 0.2, 0.3, 0.9], [0, 0, 0, 1]),  # one anomalous sample, ranked first
        ([0.9, 0.2, 0.3, 0.1], [0, 0, 0, 1]),  # one anomalous sample, ranked last
        ([1.0, 1.0, 0.0, 0.0, 1.0], [1, 0, 1, 0, 1]),  # ties across classes
        ([-3.0, np.inf, 2.0, -np.inf], [1, 1, 0, 0]),  # infinities are scores like any other
    ],
)
def test_adversarial_cases_equal_sklearn(scores: list[float], labels: list[int]) -> None:
    s, y = np.array(scores), np.array(labels)
    ours = compute_metrics(s, y)
    finite = np.nan_to_num(s, posinf=1e300, neginf=-1e300)  # sklearn rejects infinities, the ranking is the same
    expected = sklearn_metrics(finite, y)
    assert [ours["image_auroc"], ours["image_ap"], ours["image_f1_max"]] == pytest.approx(
        [expected["auroc"], expected["ap"], expected["f1_max"]], abs=1e-6
    )


def test_one_anomalous_pixel_and_constant_maps() -> None:
    maps = np.zeros((2, 5, 5), dtype=np.float32)
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[1, 2, 2] = True
    ours = compute_metrics([0.0, 0.0], [0, 1], maps, masks)  # constant everything: all ties
    assert ours["pixel_auroc"] == pytest.approx(0.5)
    assert ours["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()))
    assert ours["pixel_aupro"] == pytest.approx(reference_aupro(maps, masks), abs=1e-9)
    maps[1, 2, 2] = 1.0
    assert compute_metrics([0.0, 1.0], [0, 1], maps, masks)["pixel_aupro"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------------
# AUPRO
# ---------------------------------------------------------------------------------------------------------------------


@EXAMPLES
@given(map_problems(), st.sampled_from([0.3, 0.05, 1.0]))
@pytest.mark.filterwarnings("ignore::cnc_ad.metrics.UndefinedMetricWarning")  # no anomalous image here
def test_aupro_equals_dense_threshold_reference(problem: tuple[np.ndarray, np.ndarray], max_fpr: float) -> None:
    maps, masks = problem
    expected = reference_aupro(maps, masks, max_fpr)
    assert aupro(maps, masks, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-3)
    if max_fpr == 0.3:  # the accumulator, one image per batch: regions are counted across batches
        acc = MetricAccumulator()
        for amap, mask in zip(maps, masks, strict=True):
            acc.update([0.0], [0], amap[None], mask[None])
        assert acc.compute()["pixel_aupro"] == pytest.approx(expected, abs=1e-3)


def test_aupro_on_blob_data_equals_reference() -> None:
    _, _, maps, masks = blob_data(n=6, size=24, seed=3)
    maps = np.round(maps * 200) / 200  # few distinct scores, so the slow reference stays fast
    assert aupro(maps, masks) == pytest.approx(reference_aupro(maps, masks), abs=1e-6)


def test_aupro_perfect_and_inverted() -> None:
    _, _, _, masks = blob_data(n=10, size=32, seed=1)
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)
    assert aupro(1.0 - masks.astype(np.float32), masks) < 0.01


def test_regions_are_8_connected_within_each_image() -> None:
    maps = np.zeros((2, 6, 6), dtype=np.float32)
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region with 8-connectivity
    masks[0, 4:6, 4:6] = True  # a second region
    maps[0, 0, 0] = 1.0  # only half of the diagonal region is found
    fpr, pro = pro_curve_points(maps, masks)
    assert pro[fpr == 0].max() == pytest.approx((0.5 + 0.0) / 2)  # 4-connectivity would give (1 + 0 + 0) / 3

    maps[:] = 0.0
    masks[:] = False
    masks[0, 2, 2] = True  # one pixel in image 0 ...
    masks[1, 1:4, 2] = True  # ... touching a region of image 1 at the same place: still two regions
    maps[0, 2, 2] = 1.0
    fpr, pro = pro_curve_points(maps, masks)
    assert pro[fpr == 0].max() == pytest.approx(0.5)  # one region of 4 pixels would give 0.25


# ---------------------------------------------------------------------------------------------------------------------
# streaming, merging, distributed states
# ---------------------------------------------------------------------------------------------------------------------


def test_streaming_equals_exact_on_blob_data() -> None:
    scores, labels, maps, masks = blob_data()
    exact = compute_metrics(scores, labels, maps, masks)
    streaming = MetricAccumulator("streaming")
    for i in range(0, len(scores), 7):
        streaming.update(scores[i : i + 7], labels[i : i + 7], maps[i : i + 7], masks[i : i + 7])
    binned = streaming.compute()
    fitted = compute_metrics(scores, labels, maps, masks, mode="streaming")  # bins over the data's own range
    for key in METRIC_KEYS:
        assert binned[key] == pytest.approx(exact[key], abs=1e-3), key
        assert fitted[key] == pytest.approx(exact[key], abs=1e-3), key
    assert 0.5 < exact["pixel_aupro"] < 1.0  # the data is neither trivial nor hopeless
    for key, bound in streaming.error_bounds().items():
        assert abs(binned[key] - exact[key]) <= bound + 1e-12, key
    coarse = MetricAccumulator("streaming", bins=64)  # the bound holds however coarse the bins
    coarse.update(scores, labels, maps, masks)
    for key, bound in coarse.error_bounds().items():
        assert abs(coarse.compute()[key] - exact[key]) <= bound + 1e-12, key


@pytest.mark.parametrize("mode", ["exact", "streaming"])
def test_merge_of_halves_equals_whole(mode: str) -> None:
    scores, labels, maps, masks = blob_data(n=20, size=32)
    whole, first, second = (MetricAccumulator(mode) for _ in range(3))
    whole.update(scores, labels, maps, masks)
    first.update(scores[:9], labels[:9], maps[:9], masks[:9])
    second.update(scores[9:], labels[9:], maps[9:], masks[9:])
    expected = whole.compute()
    for merged in (first + second, first.merge(second), sum([first, second])):
        assert merged.compute() == pytest.approx(expected, abs=1e-12)
    assert first.compute() != pytest.approx(expected)  # merging did not alter the parts


@pytest.mark.parametrize("mode", ["exact", "streaming"])
def test_state_dicts_reduce_like_torch_distributed(mode: str) -> None:
    scores, labels, maps, masks = blob_data(n=20, size=32)
    ranks = [MetricAccumulator(mode) for _ in range(2)]
    ranks[0].update(scores[:10], labels[:10], maps[:10], masks[:10])
    ranks[1].update(scores[10:], labels[10:], maps[10:], masks[10:])
    states = [{key: torch.from_numpy(value) for key, value in acc.state_dict().items()} for acc in ranks]
    reduced = {
        key: states[0][key] + states[1][key]
        if key in MetricAccumulator.SUMMED_KEYS
        else states[0][key]
        if key == "score_range"
        else torch.cat([states[0][key], states[1][key]])
        for key in states[0]
    }
    rebuilt = MetricAccumulator.from_state_dict(reduced)
    assert rebuilt.is_streaming == (mode == "streaming")
    assert rebuilt.compute() == pytest.approx((ranks[0] + ranks[1]).compute(), abs=1e-12)


def test_exact_merged_into_streaming_and_auto_mode() -> None:
    scores, labels, maps, masks = blob_data(n=20, size=32)
    exact = compute_metrics(scores, labels, maps, masks)
    streaming, kept = MetricAccumulator("streaming"), MetricAccumulator("exact")
    streaming.update(scores[:10], labels[:10], maps[:10], masks[:10])
    kept.update(scores[10:], labels[10:], maps[10:], masks[10:])
    for merged in (streaming + kept, kept + streaming):
        assert merged.is_streaming
        assert merged.compute() == pytest.approx(exact, abs=1e-3)
    auto = MetricAccumulator("auto", max_exact_pixels=5 * 32 * 32)
    for i in range(0, 20, 4):
        auto.update(scores[i : i + 4], labels[i : i + 4], maps[i : i + 4], masks[i : i + 4])
    assert auto.is_streaming
    assert auto.compute() == pytest.approx(exact, abs=1e-3)
    assert compute_metrics(scores, labels, maps, masks, mode="auto", max_exact_pixels=100) == pytest.approx(
        exact, abs=1e-3
    )


def test_state_dict_round_trip_keeps_the_streaming_configuration() -> None:
    scores, labels, maps, masks = blob_data(n=10, size=16)
    acc = MetricAccumulator("streaming", bins=1000, score_range=(0.0, 3.0))
    acc.update(scores, labels, maps, masks)
    rebuilt = MetricAccumulator.from_state_dict(acc.state_dict())
    assert (rebuilt.bins, rebuilt.score_range) == (1000, (0.0, 3.0))
    assert rebuilt.compute() == acc.compute()


def test_pixel_metrics_may_cover_part_of_the_batch() -> None:
    scores, labels, maps, masks = blob_data(n=10, size=16)
    has_mask = np.arange(10) % 3 != 0  # images without ground truth count for the image metrics only
    acc = MetricAccumulator()
    acc.update(scores, labels, maps[has_mask], masks[has_mask])
    acc.update(scores[:2], labels[:2], maps[:0], masks[:0])  # a batch with no ground truth at all
    expected = compute_metrics(scores[has_mask], labels[has_mask], maps[has_mask], masks[has_mask])
    ours = acc.compute()
    assert {k: ours[k] for k in PIXEL_KEYS} == pytest.approx({k: expected[k] for k in PIXEL_KEYS}, abs=1e-12)
    with pytest.warns(UndefinedMetricWarning):
        image = compute_metrics(np.r_[scores, scores[:2]], np.r_[labels, labels[:2]], maps[:0], masks[:0])
    assert {k: ours[k] for k in IMAGE_KEYS} == pytest.approx({k: image[k] for k in IMAGE_KEYS}, abs=1e-12)


def test_streaming_states_with_different_bins_do_not_merge() -> None:
    with pytest.raises(ValueError, match="same settings"):
        MetricAccumulator("streaming", bins=100) + MetricAccumulator("streaming", bins=200)


def test_streaming_warns_about_clamped_scores() -> None:
    scores, labels, maps, masks = blob_data(n=10, size=16)
    acc = MetricAccumulator("streaming", score_range=(0.0, 0.5))
    acc.update(scores, labels, maps, masks)
    with pytest.warns(ScoreRangeWarning, match="clamped"):
        acc.compute()


def test_torch_inputs_with_channel_dimension() -> None:
    scores, labels, maps, masks = blob_data(n=8, size=16)
    expected = compute_metrics(scores, labels, maps, masks)
    ours = compute_metrics(
        torch.from_numpy(scores),
        torch.from_numpy(labels),
        torch.from_numpy(maps)[:, None],
        torch.from_numpy(masks)[:, None].float(),
    )
    assert ours == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# undefined metrics and means
# ---------------------------------------------------------------------------------------------------------------------


def test_all_normal_gives_nan_with_one_warning() -> None:
    maps = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = compute_metrics([0.1, 0.2, 0.3], [0, 0, 0], maps, np.zeros((3, 8, 8), bool), name="bottle")
    assert all(math.isnan(ours[key]) for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc"))
    assert math.isnan(ours["pixel_aupro"])
    assert [w.category for w in caught] == [UndefinedMetricWarning]
    assert "bottle" in str(caught[0].message)
    assert "no anomalous pixel" in str(caught[0].message)


def test_maps_without_masks_give_nan_pixel_metrics() -> None:
    with pytest.warns(UndefinedMetricWarning, match="without masks"):
        ours = compute_metrics([0.1, 0.9], [0, 1], np.zeros((2, 4, 4)))
    assert ours["image_auroc"] == 1.0
    assert all(math.isnan(ours[key]) for key in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"))


def test_defined_metrics_do_not_warn() -> None:
    scores, labels, maps, masks = blob_data(n=8, size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_metrics(scores, labels, maps, masks)


def test_mean_metrics_leave_out_undefined_categories() -> None:
    per_category = {
        "bottle": {"image_auroc": 0.9, "pixel_aupro": 0.8},
        "cable": {"image_auroc": 0.7, "pixel_aupro": math.nan},
        "toy": {"image_auroc": math.nan, "pixel_aupro": math.nan},
    }
    assert mean_metrics(per_category) == pytest.approx({"image_auroc": 0.8, "pixel_aupro": 0.8})
    assert undefined_categories(per_category) == {"image_auroc": ["toy"], "pixel_aupro": ["cable", "toy"]}
    assert math.isnan(mean_metrics({"toy": {"image_auroc": math.nan}})["image_auroc"])


def test_bad_inputs_raise_with_a_message() -> None:
    with pytest.raises(ValueError, match="NaN"):
        compute_metrics([0.1, math.nan], [0, 1])
    with pytest.raises(ValueError, match="resize the masks"):
        compute_metrics([0.1, 0.2], [0, 1], np.zeros((2, 4, 4)), np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="0 \\(normal\\) or 1"):
        compute_metrics([0.1, 0.2], [0, 2])


# ---------------------------------------------------------------------------------------------------------------------
# curves
# ---------------------------------------------------------------------------------------------------------------------


def test_curves_are_downsampled_and_keep_their_area() -> None:
    scores, labels, maps, masks = blob_data(n=20, size=32)
    fpr, tpr = roc_curve_points(maps, masks, max_points=100_000)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    sk_fpr, sk_tpr, _ = roc_curve(masks.ravel(), maps.ravel())
    assert np.interp(0.1, fpr, tpr) == pytest.approx(np.interp(0.1, sk_fpr, sk_tpr), abs=1e-6)
    for x, y in (roc_curve_points(maps, masks), pr_curve_points(maps, masks), pro_curve_points(maps, masks)):
        assert 2 < x.size <= 256 and x.shape == y.shape
    fpr, pro = pro_curve_points(maps, masks, max_points=100_000)
    assert fpr[-1] == pytest.approx(0.3)
    assert np.trapezoid(pro, fpr) / 0.3 == pytest.approx(aupro(maps, masks), abs=1e-12)
    recall, precision = pr_curve_points(scores, labels)
    assert (recall[0], precision[0], recall[-1]) == (0.0, 1.0, 1.0)

    acc = MetricAccumulator()
    acc.update(scores, labels, maps, masks)
    curves = acc.curves(max_points=64)
    assert set(curves) == {"image_roc", "image_pr", "pixel_roc", "pixel_pr", "pixel_pro"}
    assert all(c["x"].size <= 64 and c["x"].shape == c["y"].shape for c in curves.values())
    thresholds = acc.f1_thresholds()
    assert thresholds["pixel"] == pytest.approx(f1_max_threshold(maps, masks)[1])
    assert thresholds["image"] == pytest.approx(f1_max_threshold(scores, labels)[1])
