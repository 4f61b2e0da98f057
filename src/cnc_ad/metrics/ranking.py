"""Metric formulas on a ranked summary of binary scores, shared by exact (sorted) and streaming (binned) mode.

Every metric here reads the same summary: the distinct scores of the positive (anomalous) samples, highest first,
with the positives at each and the negatives above and tied with each. Between two positive scores only negatives
pass the threshold, so the ROC and PRO curves through every distinct threshold (as scikit-learn and the MVTec AD
code trace them) are fixed by these counts; AP and F1 only change at positive scores. Building the summary needs one
sort of the negatives and of the positives, O(P log P), and no threshold sweep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_FPR = 0.3
"""Upper FPR limit of AUPRO (MVTec AD)."""


@dataclass(frozen=True)
class Ranked:
    """Counts at the K distinct anomalous score values, highest first.

    Attributes:
        values: (K,) the distinct scores of anomalous samples (streaming: lower bin edges), descending.
        pos: (K,) anomalous samples at each value.
        neg_gt: (K,) normal samples strictly above each value.
        neg_ge: (K,) normal samples at or above each value.
        pro: (K,) cumulative PRO at or above each value, or None for image level.
        n_pos: number of anomalous samples.
        n_neg: number of normal samples.
    """

    values: np.ndarray
    pos: np.ndarray
    neg_gt: np.ndarray
    neg_ge: np.ndarray
    pro: np.ndarray | None
    n_pos: int
    n_neg: int

    @property
    def tp(self) -> np.ndarray:
        return np.cumsum(self.pos, dtype=np.float64)


def group_desc(
    values: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Distinct values of ``values`` (descending), their counts and (optionally) summed weights."""
    order = np.argsort(values)[::-1]
    v = values[order]
    starts = np.flatnonzero(np.concatenate(([v.size > 0], v[1:] != v[:-1])))
    counts = np.diff(np.append(starts, v.size))
    summed = None if weights is None else np.add.reduceat(weights[order], starts)
    return v[starts], counts, summed


def rank_exact(neg_sorted: np.ndarray, pos: np.ndarray, pos_weights: np.ndarray | None = None) -> Ranked:
    """Ranked summary from the ascending-sorted normal scores and the (unsorted) anomalous scores."""
    values, counts, weights = group_desc(pos, pos_weights)
    n_neg = neg_sorted.size
    if values.dtype != neg_sorted.dtype:  # searchsorted would otherwise copy the large array to the common dtype
        common = np.result_type(values, neg_sorted)
        values, neg_sorted = values.astype(common), neg_sorted.astype(common, copy=False)
    neg_gt = n_neg - np.searchsorted(neg_sorted, values, side="right")
    neg_ge = n_neg - np.searchsorted(neg_sorted, values, side="left")
    pro = None if weights is None else np.minimum(np.cumsum(weights), 1.0)
    return Ranked(values, counts, neg_gt, neg_ge, pro, int(pos.size), int(n_neg))


def rank_binned(
    neg_hist: np.ndarray, pos_hist: np.ndarray, edges: np.ndarray, pro_hist: np.ndarray | None = None
) -> Ranked:
    """Ranked summary from histograms over the same bins (bin b is one score value, ``edges[b]``)."""
    neg_desc = neg_hist[::-1].astype(np.int64)
    neg_ge_all = np.cumsum(neg_desc)
    keep = np.flatnonzero(pos_hist[::-1] > 0)
    neg_ge = neg_ge_all[keep]
    neg_gt = neg_ge - neg_desc[keep]
    pro = None if pro_hist is None else np.minimum(np.cumsum(pro_hist[::-1])[keep], 1.0)
    return Ranked(
        edges[:-1][::-1][keep],
        pos_hist[::-1][keep].astype(np.int64),
        neg_gt,
        neg_ge,
        pro,
        int(pos_hist.sum()),
        int(neg_hist.sum()),
    )


def step_curve(r: Ranked, y_cum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, y) points of the curve through every distinct threshold, from (0, 0) to (1, 1).

    Between two anomalous values only normal scores pass, so the curve runs flat to ``(neg_gt / N, y_{k-1})`` and
    then (through the normal scores tied with value k) to ``(neg_ge / N, y_k)``.
    """
    k = r.values.size
    x = np.empty(2 * k + 2)
    y = np.empty(2 * k + 2)
    x[0], y[0], x[-1], y[-1] = 0.0, 0.0, 1.0, 1.0
    x[1:-1:2] = r.neg_gt / r.n_neg
    x[2:-1:2] = r.neg_ge / r.n_neg
    y[1] = 0.0
    y[3:-1:2] = y_cum[:-1]
    y[2:-1:2] = y_cum
    return x, y


def cut_at(x: np.ndarray, y: np.ndarray, x_max: float) -> tuple[np.ndarray, np.ndarray]:
    """The curve (x non-decreasing) up to ``x_max``, ending there with a linearly interpolated point."""
    cut = int(np.searchsorted(x, x_max, side="right"))
    if cut < x.size and x[cut - 1] < x_max:
        y_max = y[cut - 1] + (y[cut] - y[cut - 1]) * (x_max - x[cut - 1]) / (x[cut] - x[cut - 1])
        return np.append(x[:cut], x_max), np.append(y[:cut], y_max)
    return x[:cut], y[:cut]


def trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoidal area under (x, y)."""
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) * 0.5)


def auroc(r: Ranked) -> float:
    if r.n_pos == 0 or r.n_neg == 0:
        return math.nan
    return trapezoid(*step_curve(r, r.tp / r.n_pos))


def average_precision(r: Ranked) -> float:
    if r.n_pos == 0:
        return math.nan
    tp = r.tp
    return float(np.sum(r.pos * (tp / (tp + r.neg_ge))) / r.n_pos)


def f1_max(r: Ranked) -> tuple[float, float]:
    if r.n_pos == 0:
        return math.nan, math.nan
    tp = r.tp
    precision = tp / (tp + r.neg_ge)
    recall = tp / r.n_pos
    f1 = 2 * precision * recall / (precision + recall)
    best = int(np.argmax(f1))
    return float(f1[best]), float(r.values[best])


def aupro(r: Ranked, max_fpr: float = MAX_FPR) -> float:
    if r.pro is None or r.n_pos == 0 or r.n_neg == 0:
        return math.nan
    return trapezoid(*cut_at(*step_curve(r, r.pro), max_fpr)) / max_fpr


def downsample(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points spread evenly along the curve's path length, ends kept."""
    if x.size <= max_points:
        return x, y
    path = np.concatenate(([0.0], np.cumsum(np.abs(np.diff(x)) + np.abs(np.diff(y)))))
    idx = np.unique(np.searchsorted(path, np.linspace(0.0, path[-1], max_points), side="left"))
    idx[-1] = x.size - 1
    return x[idx], y[idx]


def roc_points(r: Ranked, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    if r.n_pos == 0 or r.n_neg == 0:
        return np.empty(0), np.empty(0)
    return downsample(*step_curve(r, r.tp / r.n_pos), max_points)


def pr_points(r: Ranked, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    if r.n_pos == 0:
        return np.empty(0), np.empty(0)
    tp = r.tp
    recall = np.concatenate(([0.0], tp / r.n_pos))
    precision = np.concatenate(([1.0], tp / (tp + r.neg_ge)))
    return downsample(recall, precision, max_points)


def pro_points(r: Ranked, max_fpr: float, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    if r.pro is None or r.n_pos == 0 or r.n_neg == 0:
        return np.empty(0), np.empty(0)
    x, y = cut_at(*step_curve(r, r.pro), max_fpr)
    return downsample(x, y, max_points)
