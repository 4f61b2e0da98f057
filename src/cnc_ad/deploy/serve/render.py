"""Per-image results as JSON: map statistics and PNG renderings of a decided image.

Uploads are decoded and decided by :class:`cnc_ad.deploy.Detector` (:mod:`cnc_ad.deploy.inputs`,
:meth:`~cnc_ad.deploy.Detector.decide`), exactly as files are, so the server's scores equal ``Detector.predict`` on
those files; this module only renders the result. Maps, masks and overlays are returned at the image's own size, or
scaled down to ``max_side`` on the longer side.
"""

from __future__ import annotations

import base64
import math
from typing import Any

import numpy as np
from PIL import Image

from cnc_ad.deploy.detector import ImageResult
from cnc_ad.thresholds import KINDS, Thresholds
from cnc_ad.visualize import to_png_bytes

OUTPUTS = ("map", "mask", "overlay")


def output_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``(H, W)`` scaled down (never up) so that the longer side is at most ``max_side``."""
    height, width = size
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def png_base64(array: np.ndarray) -> str:
    return base64.b64encode(to_png_bytes(array)).decode("ascii")


def json_float(value: float | None) -> float | None:
    """A float for JSON: None for None, NaN or infinity."""
    return None if value is None or not math.isfinite(value) else float(value)


def describe_thresholds(stored: Thresholds | None) -> dict[str, Any]:
    """The thresholds a server decides by, as JSON: ``thresholds`` (``{"image": {category: value}, "pixel": {...}}``,
    NaN as null), ``threshold_basis`` (the same keys, each ``{"rule", "images"}``: how the value was found) and
    ``thresholds_digest`` (:meth:`~cnc_ad.thresholds.Thresholds.digest`, which every decision records); all null
    without thresholds.
    """
    if stored is None:
        return {"thresholds": None, "threshold_basis": None, "thresholds_digest": None}
    return {
        "thresholds": {kind: {key: json_float(t.value) for key, t in stored.table(kind).items()} for kind in KINDS},
        "threshold_basis": {
            kind: {key: {"rule": t.rule, "images": t.images} for key, t in stored.table(kind).items()} for kind in KINDS
        },
        "thresholds_digest": stored.digest(),
    }


def render_result(
    result: ImageResult,
    image: Image.Image | None,
    *,
    outputs: frozenset[str] = frozenset(),
    max_side: int = 1024,
) -> dict[str, Any]:
    """The JSON of one decided image (everything but its name and threshold source).

    Args:
        result: the decision (:meth:`cnc_ad.deploy.Detector.decide`).
        image: the decoded RGB image (needed for ``"overlay"`` only; best already at the returned size).
        outputs: which of ``"map"``, ``"mask"``, ``"overlay"`` to return as base64 PNG.
        max_side: longest side of the returned PNGs and of the map the statistics are computed on.

    Returns:
        ``score``, ``is_anomalous``, ``pixel_threshold``, ``width``, ``height``, ``map_stats`` (``max``, ``mean``,
        ``anomalous_fraction`` of pixels >= pixel threshold, ``map_size`` ``[H, W]`` they are computed at), and the
        requested PNGs: ``map`` (8-bit grey: value = ``map_range[0]`` + grey / 255 x span), ``mask`` (white =
        anomalous), ``overlay`` (heatmap over the image, colour scale 0 to 2 x pixel threshold).
    """
    height, width = result.size
    shown = output_size(result.size, max_side)
    full = result.anomaly_map(shown)  # (h, w) float32: the image's own size unless it is larger than max_side
    mask = result.mask(anomaly_map=full)
    pixel_threshold = result.pixel_threshold
    body: dict[str, Any] = {
        "score": json_float(result.score),
        "is_anomalous": result.is_anomalous,
        "pixel_threshold": json_float(pixel_threshold),
        "width": width,
        "height": height,
        "map_stats": {
            "max": json_float(float(full.max())),
            "mean": json_float(float(full.mean())),
            "anomalous_fraction": None if mask is None else float(mask.mean()),
            "map_size": list(shown),
        },
    }
    if "map" in outputs:
        low = min(0.0, float(np.nanmin(full)))
        high = max(float(np.nanmax(full)), 2.0 * pixel_threshold if pixel_threshold else 0.0, low + 1e-6)
        grey = np.rint(np.clip((np.nan_to_num(full, nan=low) - low) / (high - low), 0.0, 1.0) * 255.0)
        body["map"] = png_base64(grey.astype(np.uint8))
        body["map_range"] = [low, high]
    if "mask" in outputs:
        body["mask"] = None if mask is None else png_base64(mask)
    if "overlay" in outputs and image is not None:
        if image.size != (shown[1], shown[0]):
            image = image.resize((shown[1], shown[0]), Image.Resampling.BILINEAR, reducing_gap=3.0)
        body["overlay"] = png_base64(result.overlay(np.asarray(image, np.uint8)))
    return body
