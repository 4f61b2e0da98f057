"""Robust decoding: every Pillow mode becomes RGB uint8, masks binarise, bad files give a one-line DataError."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnc_ad.data.dataset import to_tensor
from cnc_ad.data.images import decode_image, decode_image_bytes, image_size, load_image, load_mask
from cnc_ad.data.transforms import prepare_image, prepare_mask, resize_side
from cnc_ad.errors import DataError
from tests.helpers import EPS_FILE


def _rgb(h: int = 12, w: int = 20) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_round_trip_and_resize(tmp_path):
    array = _rgb()
    Image.fromarray(array).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (12, 20, 3)
    np.testing.assert_array_equal(out, array)
    assert load_image(tmp_path / "a.png", size=8).shape == (8, 8, 3)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "1", "P"])
def test_modes_become_rgb(tmp_path, mode):
    image = Image.fromarray(_rgb()).convert(mode)
    path = tmp_path / ("a.jpg" if mode == "CMYK" else "a.png")
    image.save(path)
    out = load_image(path)
    assert out.shape == (12, 20, 3) and out.dtype == np.uint8


def test_palette_with_transparency_gives_no_warning(tmp_path, recwarn):
    image = Image.fromarray(_rgb()).convert("P")
    image.save(tmp_path / "p.png", transparency=0)
    assert load_image(tmp_path / "p.png").shape == (12, 20, 3)
    assert not [w for w in recwarn if "Palette" in str(w.message)]


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    array = np.array([[0, 32896, 65535]], np.uint16)
    Image.fromarray(array).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = load_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])


def test_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1), (10, 20, 30)).save(tmp_path / "one.png")
    out = load_image(tmp_path / "one.png", size=4)
    assert out.shape == (4, 4, 3) and tuple(out[0, 0]) == (10, 20, 30)


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (200, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    image.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (40, 20, 3)
    assert image_size(tmp_path / "r.jpg") == (40, 20)
    assert decode_image(tmp_path / "r.jpg")[1] == (40, 20)


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    Image.new("RGB", (2048, 1024), (0, 120, 240)).save(tmp_path / "big.jpg", quality=90)
    image, size = decode_image(tmp_path / "big.jpg", target=64)
    assert size == (1024, 2048)  # the full-scale size is still reported
    assert image.size[0] <= 512 and min(image.size) >= 64  # draft() decoded at 1/4 or 1/8 scale
    out = load_image(tmp_path / "big.jpg", size=64)
    assert out.shape == (64, 64, 3) and abs(int(out[..., 2].mean()) - 240) < 4


def _one_line(err: pytest.ExceptionInfo, path: Path) -> str:
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError) as err:
        load_image(tmp_path / "empty.png")
    assert "empty" in _one_line(err, tmp_path / "empty.png")


def test_text_named_png(tmp_path):
    (tmp_path / "text.png").write_text("not an image at all\n" * 5)
    with pytest.raises(DataError) as err:
        load_image(tmp_path / "text.png")
    message = _one_line(err, tmp_path / "text.png")
    assert "re-copy, convert or remove" in message and "--" not in message  # library terms, no CLI flags


def test_a_format_not_accepted_is_refused_before_any_decoder_runs(tmp_path, ghostscript_calls):
    path = tmp_path / "x.png"  # an EPS file under an image name
    path.write_bytes(EPS_FILE)
    for read in (load_image, load_mask, image_size):
        with pytest.raises(DataError) as err:
            read(path)
        message = _one_line(err, path)
        assert "in EPS format, which is not accepted" in message and "convert it to PNG" in message
    with pytest.raises(DataError, match=r"image cam\.png is in EPS format, which is not accepted"):
        decode_image_bytes(EPS_FILE, name="cam.png")
    assert ghostscript_calls == []


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM", "JPEG2000", "TGA"])
def test_every_accepted_format_decodes(tmp_path, fmt):
    path = tmp_path / "a.img"  # the content decides, not the name
    Image.fromarray(_rgb(), "RGB").save(path, fmt)
    assert load_image(path).shape == (12, 20, 3)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(tmp_path, fmt):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(DataError) as err:
        load_image(path)
    _one_line(err, path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image(tmp_path / "nope.png")


def test_decompression_bomb_is_a_data_error(tmp_path, monkeypatch):
    Image.new("RGB", (64, 64)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match="CNC_MAX_IMAGE_PIXELS"):
        load_image(tmp_path / "bomb.png")
    monkeypatch.setenv("CNC_MAX_IMAGE_PIXELS", "0")
    assert load_image(tmp_path / "bomb.png").shape == (64, 64, 3)


@pytest.mark.parametrize("high", [1, 255])
def test_masks_binarise(tmp_path, high):
    array = np.zeros((8, 8), np.uint8)
    array[2:6, 2:6] = high
    Image.fromarray(array).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png")
    assert mask.dtype == bool and mask.sum() == 16
    assert load_mask(tmp_path / "m.png", size=4).sum() == 4


def test_rgb_and_bilevel_masks(tmp_path):
    array = np.zeros((8, 8, 3), np.uint8)
    array[0, 0, 2] = 7
    Image.fromarray(array).save(tmp_path / "rgb.png")
    Image.fromarray(array[..., 2] > 0).save(tmp_path / "bit.png")
    assert load_mask(tmp_path / "rgb.png").sum() == 1
    assert load_mask(tmp_path / "bit.png").sum() == 1


def test_protocol_transforms():
    image = Image.fromarray(_rgb(30, 30))
    assert prepare_image(image, 16, "ader").shape == (16, 16, 3)
    assert resize_side(392, "dinomaly") == 448
    assert prepare_image(image, 16, "dinomaly").shape == (16, 16, 3)
    mask = np.zeros((30, 30), bool)
    mask[10:20, 10:20] = True
    for protocol in ("ader", "dinomaly"):
        out = prepare_mask(mask, 16, protocol)
        assert out.shape == (16, 16) and out.dtype == np.float32 and set(np.unique(out)) <= {0.0, 1.0}
    border = np.zeros((30, 30), bool)
    border[:, :1] = True  # a defect on the left edge is cropped away by the Dinomaly protocol
    assert prepare_mask(border, 16, "dinomaly").sum() == 0 and prepare_mask(border, 16, "ader").sum() == 0
    tensor = to_tensor(_rgb(4, 5))
    assert tensor.shape == (3, 4, 5) and tensor.min() >= 0 and tensor.max() <= 1
    with pytest.raises(DataError, match="protocol"):
        prepare_mask(mask, 16, "other")


_MAGIC = st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"RIFF"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(magic=_MAGIC, body=st.binary(max_size=300), size=st.sampled_from([None, 8]))
def test_fuzz_random_bytes_raise_only_data_error(tmp_path, magic, body, size):
    path = tmp_path / "fuzz.png"
    path.write_bytes(magic + body)
    try:
        out = load_image(path, size=size)
    except DataError as err:
        assert "\n" not in str(err)
    else:
        assert out.ndim == 3 and out.shape[2] == 3 and out.dtype == np.uint8
    with contextlib.suppress(DataError):
        load_mask(path)
