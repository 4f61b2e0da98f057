"""Metric functions on whole arrays: the seven metrics, F1-max thresholds, curves, and means over categories."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from cnc_ad.metrics import ranking
from cnc_ad.metrics.accumulator import (
    DEFAULT_BINS,
    DEFAULT_MAX_EXACT_PIXELS,
    DEFAULT_SCORE_RANGE,
    MetricAccumulator,
    Mode,
)
from cnc_ad.metrics.inputs import as_scores, to_numpy
from cnc_ad.metrics.ranking import MAX_FPR, Ranked


def compute_metrics(
    image_scores: Any,
    image_labels: Any,
    maps: Any = None,
    masks: Any = None,
    *,
    mode: Mode = "exact",
    bins: int = DEFAULT_BINS,
    score_range: tuple[float, float] | None = None,
    max_exact_pixels: int = DEFAULT_MAX_EXACT_PIXELS,
    name: str = "",
) -> dict[str, float]:
    """The seven metrics of one category (see the module docstring for the definitions).

    Args:
        image_scores: (N,) image anomaly scores.
        image_labels: (N,) 0 normal, 1 anomalous.
        maps: (N, H, W) or (N, 1, H, W) pixel anomaly scores, or None (pixel metrics NaN).
        masks: ground truth like ``maps``, or None (pixel metrics NaN).
        mode: "exact"; "streaming" (binned, see MetricAccumulator); "auto": streaming above ``max_exact_pixels``.
        bins: score bins of streaming mode.
        score_range: bin range of streaming mode; None takes the minimum and maximum of ``maps``.
        max_exact_pixels: the "auto" limit.
        name: shown in the warning about undefined metrics.

    Returns:
        ``{key: value}`` for every key of ``METRIC_KEYS``; undefined metrics are NaN, with one UndefinedMetricWarning.
    """
    if mode == "auto":
        n_pixels = 0 if maps is None or masks is None else int(np.prod(np.shape(maps)))
        mode = "streaming" if n_pixels > max_exact_pixels else "exact"
    if mode == "streaming" and score_range is None:
        score_range = _data_range(maps)
    acc = MetricAccumulator(mode, bins=bins, score_range=score_range or DEFAULT_SCORE_RANGE)
    acc.update(image_scores, image_labels, maps, masks)
    return acc._compute(name, stacklevel=3)


def _data_range(maps: Any) -> tuple[float, float]:
    """(low, high) covering every finite map score, the top one inside the last bin; the default without maps."""
    m = None if maps is None else as_scores(maps, "maps")
    finite = m[np.isfinite(m)] if m is not None else np.empty(0)
    if not finite.size:
        return DEFAULT_SCORE_RANGE
    low, high = float(finite.min()), float(finite.max())
    return low, high + max(high - low, abs(high), 1e-12) * 1e-6


def f1_max_threshold(scores: Any, labels: Any) -> tuple[float, float]:
    """Best F1 over the precision-recall curve and the threshold reaching it (``score >= threshold`` anomalous).

    Args:
        scores: (N,) or any shape (image scores, or maps) of anomaly scores.
        labels: same shape, 0/1 or bool (image labels, or masks).

    Returns:
        (F1-max, threshold); NaN and NaN without an anomalous sample.
    """
    s, y = _binary_inputs(scores, labels)
    return ranking.f1_max(ranking.rank_exact(np.sort(s[~y]), s[y]))


def _binary_inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = as_scores(scores, "scores").reshape(-1)
    y = to_numpy(labels).reshape(-1)
    if y.size != s.size:
        raise ValueError(f"{y.size} labels for {s.size} scores; give one label per score")
    return s, (y >= 0.5 if np.issubdtype(y.dtype, np.floating) else y.astype(bool))


def roc_curve_points(scores: Any, labels: Any, max_points: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve (FPR, TPR) through every distinct threshold, downsampled to at most ``max_points`` points.

    Args:
        scores: anomaly scores, any shape.
        labels: 0/1 or bool, same shape.
        max_points: the most points returned (spread along the curve; the ends are kept).

    Returns:
        (fpr, tpr), each (<= max_points,); empty if undefined.
    """
    s, y = _binary_inputs(scores, labels)
    return ranking.roc_points(ranking.rank_exact(np.sort(s[~y]), s[y]), max_points)


def pr_curve_points(scores: Any, labels: Any, max_points: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Precision-recall curve (recall, precision) at every distinct anomalous score, from (0, 1).

    Args:
        scores: anomaly scores, any shape.
        labels: 0/1 or bool, same shape.
        max_points: the most points returned.

    Returns:
        (recall, precision), each (<= max_points,); empty if undefined.
    """
    s, y = _binary_inputs(scores, labels)
    return ranking.pr_points(ranking.rank_exact(np.sort(s[~y]), s[y]), max_points)


def pro_curve_points(
    maps: Any, masks: Any, max_fpr: float = MAX_FPR, max_points: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve (FPR, PRO) from FPR 0 up to ``max_fpr`` (interpolated there), the curve AUPRO integrates.

    Args:
        maps: (N, H, W) or (N, 1, H, W) anomaly maps.
        masks: ground truth like ``maps``.
        max_fpr: where the curve is cut.
        max_points: the most points returned.

    Returns:
        (fpr, pro), each (<= max_points,); empty if undefined.
    """
    return ranking.pro_points(_pixel_ranked(maps, masks), max_fpr, max_points)


def aupro(maps: Any, masks: Any, max_fpr: float = MAX_FPR) -> float:
    """Exact AUPRO (MVTec AD definition, 8-connected regions) integrated up to ``max_fpr``, normalised by it.

    Args:
        maps: (N, H, W) or (N, 1, H, W) anomaly maps.
        masks: ground truth like ``maps``.
        max_fpr: upper FPR limit of the integral.

    Returns:
        AUPRO in [0, 1]; NaN without an anomalous or a normal pixel.
    """
    return ranking.aupro(_pixel_ranked(maps, masks), max_fpr)


def _pixel_ranked(maps: Any, masks: Any) -> Ranked:
    """Pixel-level summary of (N, H, W) maps and masks, through the accumulator's exact path."""
    n = int(np.shape(maps)[0])
    acc = MetricAccumulator()
    acc.update(np.zeros(n), np.zeros(n), maps, masks)
    pixel = acc._ranked()[1]
    return pixel if pixel is not None else ranking.Ranked(*(np.empty(0),) * 4, None, 0, 0)


# ---------------------------------------------------------------------------------------------------------------------
# Means over categories
# ---------------------------------------------------------------------------------------------------------------------


def mean_metrics(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over the categories where it is defined (NaN values are left out).

    A metric undefined in every category is NaN. ``undefined_categories`` says which categories each mean left out.

    Args:
        per_category: ``{category: {metric: value}}``.

    Returns:
        ``{metric: mean}`` for every metric present in any category.
    """
    keys = list(dict.fromkeys(key for values in per_category.values() for key in values))
    out = {}
    for key in keys:
        values = [float(v[key]) for v in per_category.values() if key in v and not math.isnan(float(v[key]))]
        out[key] = float(np.mean(values)) if values else math.nan
    return out


def undefined_categories(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, list[str]]:
    """For each metric, the categories where it is NaN or missing (left out of ``mean_metrics``); only metrics with
    at least one such category are listed.

    Args:
        per_category: ``{category: {metric: value}}``.
    """
    keys = list(dict.fromkeys(key for values in per_category.values() for key in values))
    out: dict[str, list[str]] = {}
    for key in keys:
        left_out = [cat for cat, v in per_category.items() if key not in v or math.isnan(float(v[key]))]
        if left_out:
            out[key] = left_out
    return out
