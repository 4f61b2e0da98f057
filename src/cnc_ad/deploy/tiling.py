"""Scoring large images tile by tile, for small defects on big scans (NumPy and Pillow only).

A 4000-8000 px scan resized to the model's input (256 px for the offline preset) shrinks a defect of a few pixels
below one token. Instead the image is cut into overlapping square tiles of ``tile`` pixels, each tile is prepared like
any whole image (:func:`cnc_ad.data.transforms.prepare_image`, a bilinear resize to the model's input) and scored on
its own, and the tiles' anomaly maps are placed back on their footprint and averaged where they overlap into one map of
the whole image (at ``map_size / tile`` of its resolution, so memory stays bounded). The image score is the model's
score rule applied to the stitched map (:func:`map_score`; with ``model.score_levels`` other than the map's levels,
a tiled image's score is read from the stitched map of the map's levels, so thresholds for tiles are set with tiles).
Tiles should be about the size of the images the model was trained on, seen at the same scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cnc_ad.data.transforms import prepare_image, to_chw
from cnc_ad.errors import ConfigError

TILES_RULE = ";tiles"
"""A threshold rule set on tiled scores ends with ``";tiles=<px>/<overlap>"``."""
SCORE_RULES = ("max", "top1", "pool16")

# The model on prepared tiles, (B, 3, S, S) float32 in [0, 1] -> maps (B, M, M).
MapFunction = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Tiling:
    """Score each image by overlapping square tiles of ``tile`` pixels (at the image's own resolution), each resized
    to the model's input, their maps stitched into one: for large images with small defects.

    Raises:
        ConfigError: a tile under 1 pixel, or an overlap outside [0, 1).
    """

    tile: int
    overlap: float = 0.25

    def __post_init__(self) -> None:
        if self.tile < 1:
            raise ConfigError(f"tile side {self.tile}: give a positive number of pixels, e.g. 512")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"tile overlap {self.overlap}: give a share in [0, 1), e.g. 0.25")

    def describe(self) -> str:
        return f"{self.tile} px tiles, overlap {self.overlap:g}"

    def rule_suffix(self) -> str:
        """What a threshold set with these tiles adds to its rule (``";tiles=512/0.25"``)."""
        return f"{TILES_RULE}={self.tile}/{self.overlap:g}"


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``[0, length)``, ``overlap`` (a share in [0, 1)) apart.

    The last tile ends flush with the image; an image shorter than a tile gets one tile at 0 (padded by the caller).
    """
    if tile < 1:
        raise ValueError(f"tile must be a positive number of pixels, got {tile}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile overlap must be in [0, 1), got {overlap}")
    if length <= tile:
        return [0]
    stride = max(1, round(tile * (1.0 - overlap)))
    count = math.ceil((length - tile) / stride) + 1
    return sorted({min(k * stride, length - tile) for k in range(count)})


def map_score(anomaly_map: np.ndarray, rule: str = "max") -> float:
    """The image score of a (stitched) map ``(H, W)`` by the model's rule (:func:`cnc_ad.model.anomaly_map.image_score`
    on a single map): ``"max"``, ``"top1"`` (mean of the top 1 % of pixels) or ``"pool16"`` (maximum of the 16 x 16
    sliding-window mean).
    """
    values = np.asarray(anomaly_map, np.float64)
    if rule == "max":
        return float(values.max())
    if rule == "top1":
        flat = values.ravel()
        k = max(1, math.floor(flat.size * 0.01))
        return float(np.partition(flat, flat.size - k)[flat.size - k :].mean())
    if rule == "pool16":
        size = min(16, *values.shape)
        integral = np.pad(values, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        window = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
        return float(window.max() / (size * size))
    raise ValueError(f"unknown score rule {rule!r}; choose one of {', '.join(SCORE_RULES)}")


def score_tiled(
    map_function: MapFunction,
    image: np.ndarray,
    tiling: Tiling,
    *,
    image_size: int,
    score_rule: str = "max",
    batch_size: int = 8,
) -> tuple[float, np.ndarray]:
    """Score one large image by overlapping tiles.

    Args:
        map_function: the model on prepared tiles, (B, 3, S, S) float32 in [0, 1] -> maps (B, M, M).
        image: (H, W, 3) uint8 RGB at full resolution.
        tiling: the tile side and overlap.
        image_size: the model's input side S.
        score_rule: the image score rule applied to the stitched map (:func:`map_score`).
        batch_size: tiles per call of ``map_function``.

    Returns:
        ``(score, map)``: the image score and the stitched map (H', W') with ``H' = ceil(H * M / tile)``.
    """
    tile = tiling.tile
    height, width = image.shape[:2]
    if height < tile or width < tile:  # pad small images up to one tile (replicated borders)
        image = np.pad(image, ((0, max(0, tile - height)), (0, max(0, tile - width)), (0, 0)), mode="edge")
    boxes = [
        (y, x)
        for y in tile_starts(image.shape[0], tile, tiling.overlap)
        for x in tile_starts(image.shape[1], tile, tiling.overlap)
    ]
    total = count = np.zeros((0, 0), np.float32)
    scale, map_size, out_h, out_w = 0.0, 0, 0, 0
    for start in range(0, len(boxes), max(1, batch_size)):
        part = boxes[start : start + max(1, batch_size)]
        crops = np.stack(
            [to_chw(prepare_image(Image.fromarray(image[y : y + tile, x : x + tile]), image_size)) for y, x in part]
        )  # (b, 3, S, S)
        maps = np.asarray(map_function(crops), np.float32)  # (b, M, M)
        if not start:  # the stitched map's grid, once the maps' side is known
            map_size = int(maps.shape[-1])
            scale = map_size / tile
            out_h, out_w = math.ceil(image.shape[0] * scale), math.ceil(image.shape[1] * scale)
            total, count = np.zeros((out_h, out_w), np.float32), np.zeros((out_h, out_w), np.float32)
        for (y, x), tile_map in zip(part, maps, strict=True):
            top, left = round(y * scale), round(x * scale)
            bottom, right = min(out_h, top + map_size), min(out_w, left + map_size)
            total[top:bottom, left:right] += tile_map[: bottom - top, : right - left]
            count[top:bottom, left:right] += 1.0
    stitched = total / np.maximum(count, 1.0)
    stitched = stitched[: math.ceil(height * scale), : math.ceil(width * scale)]  # drop the padding
    return map_score(stitched, score_rule), stitched
