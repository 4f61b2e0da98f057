"""MetricAccumulator: the seven metrics of one category, batch by batch, exact or streaming, mergeable."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from cnc_ad.metrics import ranking
from cnc_ad.metrics.inputs import as_labels, as_maps, as_scores, label_regions, to_numpy
from cnc_ad.metrics.ranking import MAX_FPR, Ranked

logger = logging.getLogger(__name__)

METRIC_KEYS = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
)
IMAGE_KEYS = METRIC_KEYS[:3]
PIXEL_KEYS = METRIC_KEYS[3:]
# Column labels of the metrics, as in the paper's tables (docs/method.md, Evaluation), in the order of METRIC_KEYS.
METRIC_LABELS: dict[str, str] = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1_max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "pixel_f1_max": "P-F1max",
    "pixel_aupro": "AUPRO",
}

DEFAULT_BINS = 1 << 16
DEFAULT_SCORE_RANGE = (0.0, 2.0)
DEFAULT_MAX_EXACT_PIXELS = 1 << 28
"""``mode="auto"`` turns streaming above this many pixel scores (1 GiB of float32)."""

Mode = Literal["exact", "streaming", "auto"]

_EMPTY_DTYPES = {"image_scores": np.float64, "image_labels": np.bool_, "pixel_pos_region_size": np.int32}


class UndefinedMetricWarning(UserWarning):
    """A metric is undefined for the data given (no anomalous or no normal sample, no masks); it is NaN."""


class ScoreRangeWarning(UserWarning):
    """Streaming mode clamped scores outside its ``score_range``; its metrics may be off."""


class MetricAccumulator:
    """Collects image scores and anomaly maps batch by batch and computes the seven metrics of one category.

    Image scores and labels are always kept exactly (9 bytes per image). For pixels:

    - ``mode="exact"`` keeps every pixel score in the dtype given (float16 maps halve the memory, at the cost of
      float16 rounding) split into normal and anomalous, and each anomalous pixel's region size; masks are not kept.
      Memory is about ``itemsize`` bytes per pixel.
    - ``mode="streaming"`` keeps three histograms of ``bins`` bins over ``score_range``: normal and anomalous pixel
      counts, and per bin the sum of ``1 / region_size`` over anomalous pixels (divided by the number of regions, it
      is that bin's share of PRO). Scores outside the range are clamped into the end bins and counted, and compute()
      warns about them. Memory is ``3 * bins * 8`` bytes whatever the number of pixels.
    - ``mode="auto"`` starts exact and turns streaming once more than ``max_exact_pixels`` pixel scores are kept.

    Accumulators combine with ``merge`` or ``+`` (an exact state merged with a streaming one is binned first;
    streaming states must share ``bins`` and ``score_range``). For ``torch.distributed``, ``state_dict()`` gives the
    state as numpy arrays: those named in ``SUMMED_KEYS`` add elementwise (``all_reduce(SUM)``), ``score_range``
    (streaming configuration, equal everywhere) is kept once, all others concatenate along axis 0 (gathered);
    ``from_state_dict`` rebuilds an accumulator from the result. The simplest route is ``all_gather_object`` of the
    state dicts and ``sum`` of the rebuilt accumulators.

    Args:
        mode: "exact", "streaming" or "auto".
        bins: number of pixel score bins (streaming).
        score_range: (low, high) of the bins (streaming). Bin b holds ``[low + b w, low + (b + 1) w)``,
            ``w = (high - low) / bins``; pick a range that covers the scores (anomaly maps of 1 - cosine lie in
            [0, 2], the default).
        max_exact_pixels: pixel scores kept before "auto" turns streaming.
    """

    SUMMED_KEYS = frozenset(
        {"n_regions", "maps_without_masks", "clamped", "pixel_neg_hist", "pixel_pos_hist", "pro_hist"}
    )
    _COMMON_KEYS = ("image_scores", "image_labels", "n_regions", "maps_without_masks")
    _EXACT_KEYS = (*_COMMON_KEYS, "pixel_neg", "pixel_pos", "pixel_pos_region_size")
    _STREAMING_KEYS = (*_COMMON_KEYS, "clamped", "pixel_neg_hist", "pixel_pos_hist", "pro_hist")

    def __init__(
        self,
        mode: Mode = "exact",
        bins: int = DEFAULT_BINS,
        score_range: tuple[float, float] = DEFAULT_SCORE_RANGE,
        max_exact_pixels: int = DEFAULT_MAX_EXACT_PIXELS,
    ) -> None:
        if mode not in ("exact", "streaming", "auto"):
            raise ValueError(f"mode must be 'exact', 'streaming' or 'auto', not {mode!r}")
        low, high = float(score_range[0]), float(score_range[1])
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"score_range must be finite (low, high) with low < high, not {score_range!r}")
        if int(bins) < 2:
            raise ValueError(f"bins must be at least 2, not {bins!r}")
        self.mode: Mode = mode
        self.bins = int(bins)
        self.score_range = (low, high)
        self.max_exact_pixels = int(max_exact_pixels)
        self._streaming = mode == "streaming"
        keys = self._STREAMING_KEYS if self._streaming else self._EXACT_KEYS
        self._parts: dict[str, list[np.ndarray]] = {key: [] for key in keys if key not in self.SUMMED_KEYS}
        self._sums: dict[str, np.ndarray] = {key: self._zeros(key) for key in keys if key in self.SUMMED_KEYS}

    # -- state ---------------------------------------------------------------------------------------------------------

    @property
    def is_streaming(self) -> bool:
        """Whether pixel scores are binned (``mode="streaming"``, or ``"auto"`` past its limit)."""
        return self._streaming

    @property
    def edges(self) -> np.ndarray:
        """(bins + 1,) bin edges of streaming mode."""
        return np.linspace(self.score_range[0], self.score_range[1], self.bins + 1)

    def _zeros(self, key: str) -> np.ndarray:
        if key == "pro_hist":
            return np.zeros(self.bins, dtype=np.float64)
        return np.zeros(self.bins if key.endswith("_hist") else 1, dtype=np.int64)

    def _concat(self, key: str) -> np.ndarray:
        """The stored batches of ``key`` as one array (joined once and kept)."""
        parts = self._parts[key]
        if len(parts) != 1:
            joined = np.concatenate(parts) if parts else np.empty(0, dtype=_EMPTY_DTYPES.get(key, np.float32))
            parts[:] = [joined]
        return parts[0]

    @property
    def _exact_pixels(self) -> int:
        return sum(a.size for key in ("pixel_neg", "pixel_pos") for a in self._parts.get(key, ()))

    def state_dict(self) -> dict[str, np.ndarray]:
        """The state as numpy arrays: ``SUMMED_KEYS`` add across processes, ``score_range`` (streaming: the
        configuration, the same everywhere) is kept once, the others concatenate along axis 0.

        Exact-mode arrays are the stored ones, not copies; do not modify them.
        """
        state = {key: self._concat(key) for key in self._parts} | {k: v.copy() for k, v in self._sums.items()}
        if self._streaming:
            state["score_range"] = np.array(self.score_range, dtype=np.float64)
        return state

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Any],
        *,
        bins: int = DEFAULT_BINS,
        score_range: tuple[float, float] = DEFAULT_SCORE_RANGE,
        max_exact_pixels: int = DEFAULT_MAX_EXACT_PIXELS,
    ) -> MetricAccumulator:
        """Accumulator holding ``state`` (numpy arrays or tensors); exact or streaming is read from the keys.

        Args:
            state: from ``state_dict()``, possibly reduced or gathered across processes.
            bins: bins of an exact state, should it be binned later; a streaming state brings its own.
            score_range: score range of an exact state, should it be binned later; a streaming state brings its own.
            max_exact_pixels: as in the constructor.
        """
        arrays = {key: to_numpy(value) for key, value in state.items()}
        streaming = set(arrays) == {*cls._STREAMING_KEYS, "score_range"}
        if not streaming and set(arrays) != set(cls._EXACT_KEYS):
            raise ValueError(
                f"unknown metric state keys {sorted(arrays)}; expected those of MetricAccumulator.state_dict(): "
                f"{sorted(cls._EXACT_KEYS)} (exact) or {sorted({*cls._STREAMING_KEYS, 'score_range'})} (streaming)"
            )
        if streaming:
            bins, score_range = arrays["pixel_neg_hist"].size, tuple(arrays.pop("score_range").reshape(-1)[:2])
        acc = cls("streaming" if streaming else "exact", bins, score_range, max_exact_pixels)
        for key, value in arrays.items():
            if key in acc._sums:
                if value.shape != acc._sums[key].shape:
                    raise ValueError(f"metric state {key!r} has shape {value.shape}, expected {acc._sums[key].shape}")
                acc._sums[key] = value.astype(acc._sums[key].dtype)
            else:
                acc._parts[key] = [value.reshape(-1)]
        return acc

    def _bin(self, x: np.ndarray) -> np.ndarray:
        """Bin index of every score (flattened), clamped into [0, bins); counts the clamped ones."""
        low, high = self.score_range
        x = x.reshape(-1)
        self._sums["clamped"][0] += np.count_nonzero((x < low) | (x >= high))
        idx = np.floor((x - x.dtype.type(low)) * x.dtype.type(self.bins / (high - low)))
        np.clip(idx, 0, self.bins - 1, out=idx)
        return idx.astype(np.intp)

    def _add_pixels_binned(self, neg: np.ndarray, pos: np.ndarray, pos_region_size: np.ndarray) -> None:
        """Adds normal scores, anomalous scores and the anomalous pixels' region sizes to the histograms."""
        idx_pos = self._bin(pos)
        self._sums["pixel_neg_hist"] += np.bincount(self._bin(neg), minlength=self.bins)
        self._sums["pixel_pos_hist"] += np.bincount(idx_pos, minlength=self.bins)
        self._sums["pro_hist"] += np.bincount(idx_pos, 1.0 / pos_region_size.astype(np.float64), minlength=self.bins)

    def _to_streaming(self, bins: int | None = None, score_range: tuple[float, float] | None = None) -> None:
        """Bins the kept pixel scores ("auto" past its limit, or merging into a streaming state)."""
        if self._streaming:
            return
        self.bins, self.score_range = bins or self.bins, score_range or self.score_range
        neg, pos, size = (self._concat(key) for key in ("pixel_neg", "pixel_pos", "pixel_pos_region_size"))
        for key in ("pixel_neg", "pixel_pos", "pixel_pos_region_size"):
            del self._parts[key]
        self._streaming = True
        self._sums.update(
            {key: self._zeros(key) for key in self._STREAMING_KEYS if key not in self._sums and key in self.SUMMED_KEYS}
        )
        self._add_pixels_binned(neg, pos, size)

    # -- updates -------------------------------------------------------------------------------------------------------

    def update(self, image_scores: Any, image_labels: Any, maps: Any = None, masks: Any = None) -> None:
        """Adds one batch.

        Args:
            image_scores: (B,) image anomaly scores (numpy, torch or sequence).
            image_labels: (B,) 0 normal, 1 anomalous.
            maps: (M, H, W) or (M, 1, H, W) pixel anomaly scores, or None. Usually M = B; M < B leaves images
                without ground truth out of the pixel metrics (they still count for the image metrics).
            masks: ground truth like ``maps`` (bool, 0/1 ints, or floats binarised at 0.5), or None. Maps without
                masks are not kept and make the pixel metrics NaN.
        """
        scores = as_scores(image_scores, "image scores").reshape(-1)
        labels = as_labels(image_labels, scores.size)
        if maps is not None and masks is not None:
            m, g = as_maps(maps, masks)
            pos_region_size, region_sizes = label_regions(g)
        self._parts["image_scores"].append(scores.copy())
        self._parts["image_labels"].append(labels)
        if maps is None:
            return
        if masks is None:
            self._sums["maps_without_masks"][0] += 1
            return
        self._sums["n_regions"][0] += region_sizes.size
        if self._streaming:
            self._add_pixels_binned(m[~g], m[g], pos_region_size)
            return
        self._parts["pixel_neg"].append(m[~g])
        self._parts["pixel_pos"].append(m[g])
        self._parts["pixel_pos_region_size"].append(pos_region_size)
        if self.mode == "auto" and self._exact_pixels > self.max_exact_pixels:
            logger.info("metrics: more than %d pixel scores kept, switching to streaming", self.max_exact_pixels)
            self._to_streaming()

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """A new accumulator holding both states, with this one's configuration.

        Raises:
            ValueError: two streaming states with different bins or score range.
        """
        out = MetricAccumulator.from_state_dict(self.state_dict(), bins=self.bins, score_range=self.score_range)
        out.mode, out.max_exact_pixels = self.mode, self.max_exact_pixels
        theirs = MetricAccumulator.from_state_dict(other.state_dict(), bins=other.bins, score_range=other.score_range)
        if out._streaming and theirs._streaming and (out.bins, out.score_range) != (theirs.bins, theirs.score_range):
            raise ValueError(
                f"cannot merge streaming metric states with different bins/score_range ({out.bins}, {out.score_range}) "
                f"and ({theirs.bins}, {theirs.score_range}); build the accumulators with the same settings"
            )
        if out._streaming or theirs._streaming:
            ref = out if out._streaming else theirs
            out._to_streaming(ref.bins, ref.score_range)
            theirs._to_streaming(ref.bins, ref.score_range)
        for key in out._sums:
            out._sums[key] = out._sums[key] + theirs._sums[key]
        for key in out._parts:
            out._parts[key] = [out._concat(key), theirs._concat(key)]
        if out.mode == "auto" and out._exact_pixels > out.max_exact_pixels:
            out._to_streaming()
        return out

    def __add__(self, other: MetricAccumulator) -> MetricAccumulator:
        if not isinstance(other, MetricAccumulator):
            return NotImplemented
        return self.merge(other)

    def __radd__(self, other: Any) -> MetricAccumulator:
        # lets sum(accumulators) start from 0
        if isinstance(other, int) and other == 0:
            return self.merge(MetricAccumulator(self.mode, self.bins, self.score_range, self.max_exact_pixels))
        return NotImplemented

    # -- results -------------------------------------------------------------------------------------------------------

    def _ranked(self) -> tuple[Ranked, Ranked | None, str | None]:
        """Image and pixel summaries, and why pixel metrics are undefined (None if they are defined)."""
        scores, labels = self._concat("image_scores"), self._concat("image_labels")
        image = ranking.rank_exact(np.sort(scores[~labels]), scores[labels])
        n_regions = int(self._sums["n_regions"][0])
        pixel = None
        if self._streaming:
            neg_hist, pos_hist = self._sums["pixel_neg_hist"], self._sums["pixel_pos_hist"]
            if neg_hist.any() or pos_hist.any():
                pro = self._sums["pro_hist"] / n_regions if n_regions else None
                pixel = ranking.rank_binned(neg_hist, pos_hist, self.edges, pro)
        else:
            neg = self._concat("pixel_neg")
            pos = self._concat("pixel_pos")
            if neg.size or pos.size:
                neg.sort()  # in place: the kept array stays sorted, so later calls sort nothing
                weights = 1.0 / (self._concat("pixel_pos_region_size").astype(np.float64) * max(n_regions, 1))
                pixel = ranking.rank_exact(neg, pos, weights if n_regions else None)
        without = int(self._sums["maps_without_masks"][0])
        if without:
            return image, None, f"{without} batch(es) of maps came without masks"
        if pixel is None:
            return image, None, "no maps and masks were given"
        return image, pixel, None

    def compute(self, *, name: str = "") -> dict[str, float]:
        """The seven metrics, keyed by ``METRIC_KEYS``; undefined ones are NaN (one UndefinedMetricWarning).

        Args:
            name: shown in the warning (for example the category).
        """
        return self._compute(name, stacklevel=3)

    def _compute(self, name: str, stacklevel: int) -> dict[str, float]:
        if self._streaming and self._sums["clamped"][0]:
            warnings.warn(
                f"{name + ': ' if name else ''}{int(self._sums['clamped'][0])} pixel scores fell outside score_range "
                f"{self.score_range} and were clamped into the end bins, so streaming metrics may be off; build the "
                "MetricAccumulator with a score_range that covers the scores",
                ScoreRangeWarning,
                stacklevel=stacklevel,
            )
        image, pixel, reason = self._ranked()
        out = {
            "image_auroc": ranking.auroc(image),
            "image_ap": ranking.average_precision(image),
            "image_f1_max": ranking.f1_max(image)[0],
        }
        if pixel is None:
            out.update(dict.fromkeys(PIXEL_KEYS, math.nan))
        else:
            out.update(
                pixel_auroc=ranking.auroc(pixel),
                pixel_ap=ranking.average_precision(pixel),
                pixel_f1_max=ranking.f1_max(pixel)[0],
                pixel_aupro=ranking.aupro(pixel),
            )
        _warn_undefined(out, image, pixel, reason, name, stacklevel + 1)
        return out

    def error_bounds(self, max_fpr: float = MAX_FPR) -> dict[str, float]:
        """Upper bounds of |streaming - exact| for ``pixel_auroc`` and ``pixel_aupro`` (0 in exact mode).

        Thresholds on bin edges give the exact curve's points; inside a bin the binned curve is a straight line
        where the exact one is a monotone path across the same box, so each bin errs by at most half its box:
        ``AUROC: 0.5 * sum_b (n_b / N) (p_b / P)``, ``AUPRO: 0.5 / max_fpr * sum_b (n_b / N) (w_b / R)`` over the
        bins starting below ``max_fpr`` (n_b, p_b: normal and anomalous pixels in bin b; w_b: its sum of
        1 / region size; R: regions).
        """
        if not self._streaming:
            return {"pixel_auroc": 0.0, "pixel_aupro": 0.0}
        neg = self._sums["pixel_neg_hist"][::-1].astype(np.float64)
        pos = self._sums["pixel_pos_hist"][::-1].astype(np.float64)
        n_neg, n_pos, n_regions = neg.sum(), pos.sum(), float(self._sums["n_regions"][0])
        if not (n_neg and n_pos and n_regions):
            return {"pixel_auroc": math.nan, "pixel_aupro": math.nan}
        below = (np.cumsum(neg) - neg) / n_neg < max_fpr
        pro = self._sums["pro_hist"][::-1] / n_regions
        return {
            "pixel_auroc": float(0.5 * np.sum(neg * pos) / (n_neg * n_pos)),
            "pixel_aupro": float(0.5 / max_fpr * np.sum(neg[below] * pro[below]) / n_neg),
        }

    def f1_thresholds(self) -> dict[str, float]:
        """``{"image": t, "pixel": t}``: the thresholds (``score >= t`` is anomalous) reaching F1-max; NaN if
        undefined. Streaming thresholds are lower bin edges.
        """
        image, pixel, _ = self._ranked()
        return {"image": ranking.f1_max(image)[1], "pixel": math.nan if pixel is None else ranking.f1_max(pixel)[1]}

    def curves(self, max_points: int = 256, max_fpr: float = MAX_FPR) -> dict[str, dict[str, np.ndarray]]:
        """Curves for the report, each ``{"x": (<= max_points,), "y": (<= max_points,)}`` (empty if undefined).

        Keys: ``image_roc`` and ``pixel_roc`` (x FPR, y TPR), ``image_pr`` and ``pixel_pr`` (x recall, y precision),
        ``pixel_pro`` (x FPR up to ``max_fpr``, y PRO).
        """
        image, pixel, _ = self._ranked()
        empty = ranking.Ranked(np.empty(0), np.empty(0), np.empty(0), np.empty(0), None, 0, 0)
        pixel = pixel or empty
        curves = {
            "image_roc": ranking.roc_points(image, max_points),
            "image_pr": ranking.pr_points(image, max_points),
            "pixel_roc": ranking.roc_points(pixel, max_points),
            "pixel_pr": ranking.pr_points(pixel, max_points),
            "pixel_pro": ranking.pro_points(pixel, max_fpr, max_points),
        }
        return {key: {"x": x, "y": y} for key, (x, y) in curves.items()}


def _warn_undefined(
    out: dict[str, float], image: Ranked, pixel: Ranked | None, reason: str | None, name: str, stacklevel: int
) -> None:
    """One UndefinedMetricWarning naming the NaN metrics and why."""
    undefined = [key for key in METRIC_KEYS if math.isnan(out[key])]
    if not undefined:
        return
    reasons = []
    if image.n_pos == 0:
        reasons.append("no anomalous image")
    if image.n_neg == 0:
        reasons.append("no normal image")
    if reason:
        reasons.append(reason)
    elif pixel is not None:
        if pixel.n_pos == 0:
            reasons.append("no anomalous pixel")
        if pixel.n_neg == 0:
            reasons.append("no normal pixel")
    where = f"{name}: " if name else ""
    warnings.warn(
        f"{where}{', '.join(undefined)} undefined ({'; '.join(reasons)}); set to NaN and left out of means",
        UndefinedMetricWarning,
        stacklevel=stacklevel,
    )
