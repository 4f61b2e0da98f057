"""Image- and pixel-level anomaly detection metrics: exact by default, streaming (binned) on request.

Definitions followed:

- ``image_auroc``, ``pixel_auroc``: area under the ROC curve, as ``sklearn.metrics.roc_auc_score`` (a tie between a
  normal and an anomalous score counts one half).
- ``image_ap``, ``pixel_ap``: average precision, as ``sklearn.metrics.average_precision_score``
  (``sum_k (R_k - R_{k-1}) P_k`` over the distinct thresholds, no interpolation).
- ``image_f1_max``, ``pixel_f1_max``: the largest F1 over the points of ``sklearn.metrics.precision_recall_curve``
  (F1 = 0 where precision + recall = 0). Predictions are ``score >= threshold``.
- ``pixel_aupro``: the MVTec AD definition (Bergmann et al., IJCV 2021, and the MVTec AD evaluation code). For every
  threshold, PRO is the mean over all connected ground-truth regions of the category (all its images) of the fraction
  of the region's pixels at or above the threshold, and FPR is the fraction of all normal pixels of the category at
  or above it. The PRO-FPR curve through every distinct threshold, from (0, 0) to (1, 1), is integrated with the
  trapezoidal rule over FPR in [0, 0.3], interpolating linearly at 0.3, and divided by 0.3. Regions are 8-connected
  (``scipy.ndimage.label`` with a 3x3 structure of ones, as the MVTec AD reference code); they never cross images.

Exact mode sorts the normal pixel scores of a category once and reads every pixel metric off that sort (O(P log P),
no threshold sweep). Streaming mode keeps fixed-size histograms whose states add up across batches and processes.
``docs/metrics.md`` gives the streaming error bound and measured speed.

Undefined metrics (no anomalous or no normal image or pixel, no masks) are NaN with one
:class:`UndefinedMetricWarning`; :func:`mean_metrics` leaves them out and :func:`undefined_categories` says where.
"""

from __future__ import annotations

from cnc_ad.metrics.accumulator import (
    DEFAULT_BINS,
    DEFAULT_MAX_EXACT_PIXELS,
    DEFAULT_SCORE_RANGE,
    IMAGE_KEYS,
    METRIC_KEYS,
    METRIC_LABELS,
    PIXEL_KEYS,
    MetricAccumulator,
    ScoreRangeWarning,
    UndefinedMetricWarning,
)
from cnc_ad.metrics.functions import (
    aupro,
    compute_metrics,
    f1_max_threshold,
    mean_metrics,
    pr_curve_points,
    pro_curve_points,
    roc_curve_points,
    undefined_categories,
)
from cnc_ad.metrics.ranking import MAX_FPR

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_MAX_EXACT_PIXELS",
    "DEFAULT_SCORE_RANGE",
    "IMAGE_KEYS",
    "MAX_FPR",
    "METRIC_KEYS",
    "METRIC_LABELS",
    "PIXEL_KEYS",
    "MetricAccumulator",
    "ScoreRangeWarning",
    "UndefinedMetricWarning",
    "aupro",
    "compute_metrics",
    "f1_max_threshold",
    "mean_metrics",
    "pr_curve_points",
    "pro_curve_points",
    "roc_curve_points",
    "undefined_categories",
]
