"""Heatmaps, overlays and masks as pictures (:mod:`cnc_ad.visualize`)."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

from cnc_ad.visualize import colorize, mask_to_rgb, outline, overlay, resize_map, to_jpeg_bytes, to_png_bytes


def test_colorize_shape_dtype_and_scale():
    anomaly_map = np.linspace(0.0, 2.0, 64, dtype=np.float16).reshape(8, 8)
    heat = colorize(anomaly_map)
    assert heat.shape == (8, 8, 3) and heat.dtype == np.uint8
    low, high = colorize(np.array([[0.0, 1.0]]), vmin=0.0, vmax=1.0)[0]
    assert tuple(heat[0, 0]) == tuple(low) and tuple(heat[-1, -1]) == tuple(high)  # min and max reach the ends
    assert not np.array_equal(low, high)
    # A fixed scale clips: everything above vmax takes the top colour.
    clipped = colorize(anomaly_map, vmin=0.0, vmax=0.5)
    assert (clipped[-1] == high).all()


def test_colorize_constant_nan_and_bad_input():
    constant = colorize(np.full((4, 5), 3.0))
    assert constant.shape == (4, 5, 3) and (constant == constant[0, 0]).all()
    with_nan = colorize(np.array([[np.nan, 0.0], [0.5, 1.0]]))
    np.testing.assert_array_equal(with_nan[0, 0], with_nan[0, 1])  # NaN drawn as vmin
    with pytest.raises(ValueError, match="2-D"):
        colorize(np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="vmax"):
        colorize(np.zeros((4, 4)), vmin=1.0, vmax=0.0)
    assert colorize(np.zeros((2, 2)), vmax=-1.0).shape == (2, 2, 3)  # only vmax given: vmin follows it


def test_colorize_does_not_touch_pyplot():
    colorize(np.zeros((2, 2)))
    assert "matplotlib.pyplot" not in sys.modules or sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_overlay_resizes_the_map_to_the_image():
    image = np.full((40, 60, 3), 128, dtype=np.uint8)
    anomaly_map = np.zeros((16, 16), dtype=np.float32)
    anomaly_map[:, 8:] = 1.0  # right half anomalous
    blended = overlay(image, anomaly_map, alpha=0.5)
    assert blended.shape == (40, 60, 3) and blended.dtype == np.uint8
    assert not np.array_equal(blended[:, 5], blended[:, 55])
    np.testing.assert_array_equal(overlay(image, anomaly_map, alpha=0.0), image)
    np.testing.assert_array_equal(overlay(image, anomaly_map, alpha=1.0), colorize(resize_map(anomaly_map, (40, 60))))
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, anomaly_map, alpha=1.5)
    with pytest.raises(ValueError, match="uint8"):
        overlay(image.astype(np.float32), anomaly_map)


def test_resize_map():
    anomaly_map = np.arange(16, dtype=np.float16).reshape(4, 4)
    same = resize_map(anomaly_map, (4, 4))
    assert same.dtype == np.float32 and np.array_equal(same, anomaly_map)
    bigger = resize_map(anomaly_map, (8, 12))
    assert bigger.shape == (8, 12) and bigger.min() >= 0.0 and bigger.max() <= 15.0


def test_mask_to_rgb_and_outline():
    mask = np.zeros((10, 10), dtype=np.uint8)
    mask[2:8, 3:9] = 255
    rgb = mask_to_rgb(mask, color=(0, 255, 0))
    assert rgb.shape == (10, 10, 3) and rgb.dtype == np.uint8
    assert (rgb[mask > 0] == (0, 255, 0)).all() and (rgb[mask == 0] == 0).all()

    drawn = outline(np.zeros((10, 10, 3), dtype=np.uint8), mask, color=(255, 0, 0))
    red = drawn[..., 0] == 255
    assert red[2, 3:9].all() and red[7, 3:9].all() and red[2:8, 3].all() and red[2:8, 8].all()
    assert not red[3:7, 4:8].any() and not red[mask == 0].any()
    # A mask of another size is resized (nearest) to the image.
    assert outline(np.zeros((20, 20, 3), dtype=np.uint8), mask, width=2)[..., 0].any()


def test_png_and_jpeg_bytes_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(to_png_bytes(rgb))))
    np.testing.assert_array_equal(decoded, rgb)
    grey = np.asarray(Image.open(io.BytesIO(to_png_bytes(np.eye(5, dtype=bool)))))
    np.testing.assert_array_equal(grey, np.eye(5, dtype=np.uint8) * 255)
    jpeg = Image.open(io.BytesIO(to_jpeg_bytes(rgb, quality=80)))
    assert jpeg.format == "JPEG" and jpeg.size == (16, 12)
    with pytest.raises(ValueError, match="uint8"):
        to_png_bytes(rgb.astype(np.float32))
