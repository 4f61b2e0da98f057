"""Tiled scoring of large images: tiles cover the image, maps are stitched in place, a small defect stays visible."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnc_ad.tiling import predict_tiled, tile_starts


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(1000, 256, 0.25), (256, 256, 0.5), (300, 256, 0.0), (9, 4, 0.5)]
)
def test_tiles_cover_the_image_and_end_flush(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = torch.zeros(length, dtype=torch.bool)
    for start in starts:
        covered[start : start + tile] = True
    assert covered.all() and starts[0] == 0 and starts[-1] + tile == max(length, tile)
    assert starts == sorted(set(starts))


def test_bad_tiling_arguments():
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 10, 1.0)
    with pytest.raises(ValueError, match="tile"):
        tile_starts(100, 0, 0.0)


def _darkness(images: torch.Tensor) -> torch.Tensor:
    """A stand-in model: the map is how dark each pixel is, at 32 x 32."""
    return F.interpolate(1.0 - images.mean(dim=1, keepdim=True), size=(32, 32), mode="area")[:, 0]


def test_stitched_map_puts_a_small_defect_where_it_is_and_keeps_it_visible():
    image = torch.ones(3, 1024, 1536)
    image[:, 700:708, 1200:1208] = 0.0  # an 8 px defect: 0.004 % of the image
    score, stitched = predict_tiled(_darkness, image, tile=256, overlap=0.25, image_size=64, map_size=32)
    assert stitched.shape == (128, 192)  # 1/8 of the image: map_size / tile
    y, x = divmod(int(stitched.argmax()), stitched.shape[1])
    assert abs(y * 8 - 704) <= 16 and abs(x * 8 - 1204) <= 16
    # The whole image resized to the model's input averages the defect away; tiles keep 16x more of it.
    whole = float(_darkness(F.interpolate(image[None], size=(64, 64), mode="bilinear", antialias=True)).max())
    assert score > 4 * whole


def test_small_images_are_padded_to_one_tile_and_cropped_back():
    image = torch.rand(3, 100, 120)
    score, stitched = predict_tiled(_darkness, image, tile=128, overlap=0.5, image_size=64, map_size=32)
    assert stitched.shape == (25, 30) and score == pytest.approx(float(stitched.max()))
