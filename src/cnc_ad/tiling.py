"""Scoring large images tile by tile, for small defects on big scans.

A 4000-8000 px scan resized to the model's input (256 px for the offline preset) shrinks a defect of a few pixels
below one token. Instead the image is cut into overlapping square tiles of ``tile`` pixels, each tile is resized to the
model's input and scored on its own, and the tiles' anomaly maps are resized back to their footprint and averaged where
they overlap into one map of the whole image (at ``map_size / tile`` of its resolution, so memory stays bounded).
The image score is the model's score rule applied to the stitched map. Tiles should be about the size of the images
the model was trained on, seen at the same scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cnc_ad.model.anomaly_map import image_score

# Scores preprocessed images (B, 3, S, S) in [0, 1] -> maps (B, M, M).
MapFunction = Callable[[Tensor], Tensor]


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


def predict_tiled(
    map_function: MapFunction,
    image: Tensor,
    *,
    tile: int,
    overlap: float,
    image_size: int,
    map_size: int | None = None,
    score: str = "max",
    batch_size: int = 8,
) -> tuple[float, Tensor]:
    """Score one large image by overlapping tiles.

    Args:
        map_function: the model on preprocessed tiles, (B, 3, S, S) in [0, 1] -> maps (B, M, M).
        image: (3, H, W) RGB at full resolution, float in [0, 1] or uint8 (converted tile by tile: a 8000 px scan
            stays at one byte per value).
        tile: tile side in pixels of ``image``.
        overlap: share of a tile shared with its neighbour, in [0, 1).
        image_size: the model's input side S.
        map_size: the side M of the maps ``map_function`` returns (default: read from the first maps it returns).
        score: the image score rule applied to the stitched map (see :func:`image_score`).
        batch_size: tiles per call of ``map_function``.

    Returns:
        ``(score, map)``: the image score and the stitched map (H', W') with ``H' = ceil(H * M / tile)``.
    """
    _, height, width = image.shape
    if height < tile or width < tile:  # pad small images up to one tile (replicated borders)
        image = _as_float(image)
        pad_h, pad_w = max(0, tile - height), max(0, tile - width)
        image = F.pad(image[None], (0, pad_w, 0, pad_h), mode="replicate")[0]
    boxes = [
        (y, x) for y in tile_starts(image.shape[1], tile, overlap) for x in tile_starts(image.shape[2], tile, overlap)
    ]
    total = count = torch.zeros(0)
    scale, out_h, out_w = 0.0, 0, 0
    for start in range(0, len(boxes), batch_size):
        part = boxes[start : start + batch_size]
        crops = _as_float(torch.stack([image[:, y : y + tile, x : x + tile] for y, x in part]))  # (b, 3, tile, tile)
        if tile != image_size:
            crops = F.interpolate(
                crops, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
            )
        maps = map_function(crops.clamp(0.0, 1.0)).float().cpu()  # (b, M, M)
        if not start:  # the stitched map's grid, once the maps' side is known
            map_size = map_size or int(maps.shape[-1])
            scale = map_size / tile
            out_h, out_w = math.ceil(image.shape[1] * scale), math.ceil(image.shape[2] * scale)
            total, count = torch.zeros(out_h, out_w), torch.zeros(out_h, out_w)
        assert map_size is not None
        for (y, x), tile_map in zip(part, maps, strict=True):
            top, left = round(y * scale), round(x * scale)
            bottom, right = min(out_h, top + map_size), min(out_w, left + map_size)
            total[top:bottom, left:right] += tile_map[: bottom - top, : right - left]
            count[top:bottom, left:right] += 1.0
    stitched = total / count.clamp_min(1.0)
    stitched = stitched[: math.ceil(height * scale), : math.ceil(width * scale)]  # drop the padding
    return float(image_score(stitched[None, None], score)[0]), stitched


def _as_float(image: Tensor) -> Tensor:
    """uint8 -> float in [0, 1]; float unchanged."""
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image
