"""Uploaded images in, per-image results out: decoding under the server's limits, map statistics and PNG renderings.

Uploads are decoded exactly as :class:`cnc_ad.Detector` decodes the same bytes from a file
(:func:`cnc_ad.data.images.decode_image_bytes`), so the server's scores equal ``Detector.predict`` on those files.
Maps, masks and overlays are returned at the image's own size, or scaled down to ``max_side`` on the longer side.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnc_ad.data.images import decode_image_bytes
from cnc_ad.errors import DataError
from cnc_ad.serve.errors import APIError
from cnc_ad.visualize import overlay, resize_map, to_png_bytes

OUTPUTS = ("map", "mask", "overlay")


def read_upload(data: bytes, name: str, side: int, max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """Decode one uploaded file after checking its pixel count in the header.

    Args:
        data: the file's bytes.
        name: the file name (for messages).
        side: the model's input side S: large JPEGs are decoded at a reduced scale of at least S pixels.
        max_pixels: largest accepted width x height.

    Returns:
        The RGB image and its full-scale size ``(H, W)`` in pixels.

    Raises:
        APIError: 400 ``empty_file`` / ``undecodable_image``, 413 ``too_many_pixels``.
    """
    if not data:
        raise APIError(400, "empty_file", f"image {name} is empty (0 bytes); send the file's content")
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except Image.DecompressionBombError:
        width = height = math.inf  # beyond Pillow's own limit: certainly beyond ours
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        width = height = 0  # not an image: the decoder below names the problem
    if width * height > max_pixels:
        raise APIError(
            413,
            "too_many_pixels",
            f"image {name} has {width} x {height} pixels, more than the server's limit of {max_pixels}; downscale it",
        )
    try:
        return decode_image_bytes(data, side, name)
    except DataError as err:
        raise APIError(400, "undecodable_image", str(err)) from err


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


def image_result(
    *,
    image: Image.Image | None,
    size: tuple[int, int],
    score: float,
    small_map: np.ndarray,
    threshold: float | None,
    pixel_threshold: float | None,
    outputs: frozenset[str] = frozenset(),
    max_side: int = 1024,
) -> dict[str, Any]:
    """The JSON result of one image (everything but its name and threshold source).

    Args:
        image: the decoded RGB image (needed for ``"overlay"`` only).
        size: the image's full-scale ``(H, W)`` in pixels.
        score: the image anomaly score.
        small_map: the model's ``(M, M)`` anomaly map.
        threshold: image threshold (``score >= threshold`` is anomalous), or None.
        pixel_threshold: mask threshold (``map >= pixel_threshold``), or None.
        outputs: which of ``"map"``, ``"mask"``, ``"overlay"`` to return as base64 PNG.
        max_side: longest side of the returned PNGs and of the map the statistics are computed on.

    Returns:
        ``score``, ``is_anomalous``, ``pixel_threshold``, ``width``, ``height``, ``map_stats`` (``max``, ``mean``,
        ``anomalous_fraction`` of pixels >= pixel threshold, ``map_size`` ``[H, W]`` they are computed at), and the
        requested PNGs: ``map`` (8-bit grey: value = ``map_range[0]`` + grey / 255 x span), ``mask`` (white =
        anomalous), ``overlay`` (heatmap over the image, colour scale 0 to 2 x pixel threshold).
    """
    height, width = size
    shown = output_size(size, max_side)
    full = resize_map(small_map, shown)  # (h, w) float32: the image's own size unless it is larger than max_side
    mask = full >= pixel_threshold if pixel_threshold is not None else None
    result: dict[str, Any] = {
        "score": json_float(score),
        "is_anomalous": None if threshold is None else bool(score >= threshold),
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
        result["map"] = png_base64(grey.astype(np.uint8))
        result["map_range"] = [low, high]
    if "mask" in outputs:
        result["mask"] = None if mask is None else png_base64(mask)
    if "overlay" in outputs and image is not None:
        picture = (
            image
            if image.size == (shown[1], shown[0])
            else image.resize((shown[1], shown[0]), Image.Resampling.BILINEAR, reducing_gap=3.0)
        )
        vmax = 2.0 * pixel_threshold if pixel_threshold is not None and pixel_threshold > 0 else None
        drawn = overlay(np.asarray(picture, np.uint8), small_map, vmin=0.0 if vmax else None, vmax=vmax)
        result["overlay"] = png_base64(drawn)
    return result
