"""Robust image and mask decoding with Pillow.

Only the formats of :data:`IMAGE_EXTENSIONS` are decoded (:data:`IMAGE_FORMATS`: Pillow tries no other decoder, so an
EPS file named ``.png`` is refused and never handed to Ghostscript), in 8 and 16 bits, grayscale, RGBA, palette or
CMYK, with EXIF orientation applied. Any failure (empty, truncated, not an image, another format, too large) becomes a
one-line :class:`~cnc_ad.errors.DataError` that names the file and the fix, never a Pillow traceback. When the target
size is known, large JPEGs are decoded at a reduced scale (``Image.draft``) so a 12000 x 12000 photograph does not need
gigabytes of memory.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnc_ad.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".jp2", ".tga"}
)
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM", "JPEG2000", "TGA")
"""Pillow's names of the formats of :data:`IMAGE_EXTENSIONS` (``PPM`` reads .ppm, .pgm and .pbm): the only decoders
:func:`open_image` lets Pillow try, whatever a file's name says."""
ACCEPTED = "PNG, JPEG, BMP, TIFF, WebP, GIF, PPM/PGM/PBM, JPEG 2000 or TGA"
MAX_PIXELS_ENV = "CNC_MAX_IMAGE_PIXELS"
SKIP_BAD = "skip_bad=True"
"""How messages name the option that skips unreadable files (``data.skip_bad``; the CLI shows ``--skip-bad``)."""
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` has an image extension and is not a hidden file (``.DS_Store``, ``._x.png``)."""
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def open_image(source: str | os.PathLike | BinaryIO, what: str) -> Image.Image:
    """``Image.open`` restricted to :data:`IMAGE_FORMATS` (lazy: only the header is read).

    Args:
        source: a file or a binary stream.
        what: how messages name it, e.g. ``"image a.png"``.

    Raises:
        DataError: it is in a format Pillow knows but this package does not accept (EPS, PSD, ICO ...).
        UnidentifiedImageError: it is not an image at all; other errors as :func:`PIL.Image.open`.
    """
    try:
        return Image.open(source, formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        refused = _refused_format(source)
        if refused is None:
            raise
        raise DataError(
            f"{what} is in {refused} format, which is not accepted; convert it to {ACCEPTED}, or remove it"
        ) from None


def _refused_format(source: str | os.PathLike | BinaryIO) -> str | None:
    """The Pillow format whose signature ``source``'s first bytes carry, among those not accepted (checked on the
    bytes only: no decoder of theirs runs).
    """
    try:
        if isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as handle:
                prefix = handle.read(16)
        else:
            source.seek(0)
            prefix = source.read(16)
    except OSError:
        return None
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        if name in IMAGE_FORMATS or accept is None:
            continue
        try:
            result = accept(prefix)
        except Exception:  # a plugin's signature check on a short prefix: not that format
            continue
        if result and not isinstance(result, str):  # a string: Pillow's "maybe, but this build cannot read it"
            return name
    return None


def _apply_pixel_limit() -> None:
    """Let users raise Pillow's decompression-bomb limit through ``CNC_MAX_IMAGE_PIXELS`` (0 = no limit)."""
    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None:
        return
    try:
        limit = int(value)
    except ValueError as err:
        raise DataError(
            f"{MAX_PIXELS_ENV}={value!r} is not an integer; set it to a pixel count, or 0 for no limit"
        ) from err
    Image.MAX_IMAGE_PIXELS = limit if limit > 0 else None


def _describe_failure(path: Path, kind: str, err: Exception) -> DataError:
    if isinstance(err, DataError):
        return err
    if isinstance(err, Image.DecompressionBombError):
        return DataError(
            f"{kind} {path} is larger than Pillow's decompression-bomb limit ({err}); if you trust the file, "
            f"set {MAX_PIXELS_ENV} to a larger pixel count (0 = no limit), or downscale it"
        )
    try:
        empty = path.stat().st_size == 0
    except OSError:
        empty = False
    if isinstance(err, FileNotFoundError) or not path.exists():
        return DataError(f"{kind} {path} does not exist; rescan the dataset or restore the file")
    if empty:
        return DataError(f"{kind} {path} is empty (0 bytes); re-copy or remove the file")
    if isinstance(err, UnidentifiedImageError):
        reason = "not an image format Pillow can read"
    else:
        reason = str(err).splitlines()[0].replace(str(path), "file") if str(err) else type(err).__name__
    return DataError(f"cannot decode {kind} {path} ({reason}); re-copy, convert or remove the file")


def _open(source: Path | BinaryIO, target: int | None, mode: str, what: str) -> tuple[Image.Image, tuple[int, int]]:
    """Decode a file or binary stream (named ``what`` in messages) fully: the (maybe draft-reduced) image and the full
    oriented size (H, W).
    """
    with open_image(source, what) as im:
        width, height = im.size
        orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
        if orientation in _ROTATED_ORIENTATIONS:
            width, height = height, width
        if target is not None and im.format == "JPEG":
            im.draft(mode, (target, target))  # decode at 1/2, 1/4 or 1/8 scale, never below the target
        im.load()
        oriented = ImageOps.exif_transpose(im)
        if oriented is im:
            oriented = im.copy()
    return oriented, (height, width)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in _SIXTEEN_BIT_MODES or im.mode == "F":
        array = np.asarray(im).astype(np.float64)
        top = array.max(initial=0)
        if im.mode == "F":
            peak = 1.0 if top <= 1.0 else 255.0
        elif im.mode == "I":  # 32-bit integers: 8-bit data widened, or 16-bit data
            peak = 255.0 if top <= 255 else 65535.0
        else:
            peak = 65535.0
        gray = np.clip(np.round(array * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return im.convert("RGB")


def decode_image(path: str | os.PathLike, target: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an image to an RGB Pillow image.

    Args:
        path: any image file Pillow reads.
        target: the side the image will be resized to, if known: JPEGs are then decoded at a reduced scale that is
            still at least ``target`` pixels on each side.

    Returns:
        The RGB image (EXIF orientation applied) and its full-scale size ``(H, W)`` in pixels.

    Raises:
        DataError: the file is missing, empty, truncated, not an image, in a format not accepted, or too large.
    """
    path = Path(path)
    _apply_pixel_limit()
    try:
        im, size = _open(path, target, "RGB", f"image {path}")
        return _to_rgb(im), size
    except Exception as err:  # any decoder failure is a data problem; report it on one line
        raise _describe_failure(path, "image", err) from err


def decode_image_bytes(
    data: bytes, target: int | None = None, name: str = "upload"
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an image held in memory (an upload) exactly as :func:`decode_image` decodes the same bytes from a file.

    Args:
        data: the encoded file's bytes.
        target: see :func:`decode_image`.
        name: what to call the image in messages (e.g. the uploaded file's name).

    Returns:
        The RGB image (EXIF orientation applied) and its full-scale size ``(H, W)`` in pixels.

    Raises:
        DataError: the bytes are empty, truncated, not an image, in a format not accepted, or too large.
    """
    _apply_pixel_limit()
    if not data:
        raise DataError(f"image {name} is empty (0 bytes); send the file's content")
    try:
        im, size = _open(io.BytesIO(data), target, "RGB", f"image {name}")
        return _to_rgb(im), size
    except DataError:
        raise
    except Exception as err:  # any decoder failure is a data problem; report it on one line
        if isinstance(err, Image.DecompressionBombError):
            reason = f"larger than Pillow's decompression-bomb limit: {err}"
        elif isinstance(err, UnidentifiedImageError):
            reason = "not an image format Pillow can read"
        else:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"cannot decode image {name} ({reason}); send a PNG, JPEG, BMP, TIFF or WebP file") from err


def load_image(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """Read an image as RGB.

    Args:
        path: any image file Pillow reads (8/16-bit, grayscale, RGBA, palette, CMYK; EXIF rotation applied).
        size: resize to ``size x size`` pixels (bilinear, antialiased) when given.

    Returns:
        ``(H, W, 3)`` uint8 array (``H = W = size`` when resized).

    Raises:
        DataError: naming the file and the fix.
    """
    im, _ = decode_image(path, size)
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(im, dtype=np.uint8).copy()


def decode_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a mask at full size and binarise it: a pixel is anomalous where any colour channel is > 0.

    Works for 0/255, 0/1 and class-index masks, in 1-bit, 8-bit, 16-bit, palette (indices) and RGB(A) files.

    Returns:
        ``(H, W)`` bool array.

    Raises:
        DataError: naming the file and the fix.
    """
    path = Path(path)
    _apply_pixel_limit()
    try:
        im, _ = _open(path, None, "L", f"mask {path}")
        if im.mode in ("RGBA", "LA", "PA"):
            im = im.convert("RGB" if im.mode == "RGBA" else "L")
        array = np.asarray(im)
    except Exception as err:
        raise _describe_failure(path, "mask", err) from err
    if array.ndim == 3:
        array = array.max(axis=2)
    return array > 0


def resize_mask(mask: np.ndarray, side: int) -> np.ndarray:
    """Bilinear (antialiased) resize of a ``(H, W)`` 0/1 mask to ``(side, side)`` float32 values in [0, 1]."""
    image = Image.fromarray(mask.astype(np.float32))
    return np.asarray(image.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32)


def load_mask(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
    """Read a binary mask.

    Args:
        path: the mask file (0/255, 0/1 or class-index values).
        size: resize to ``size x size`` (bilinear on the 0/1 mask, then binarised at 0.5) when given.

    Returns:
        ``(H, W)`` bool array.

    Raises:
        DataError: naming the file and the fix.
    """
    mask = decode_mask(path)
    if size is not None and mask.shape != (size, size):
        mask = resize_mask(mask, size) > 0.5
    return mask


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """The oriented size ``(H, W)`` of an image, read from its header without decoding the pixels."""
    path = Path(path)
    _apply_pixel_limit()
    try:
        with open_image(path, f"image {path}") as im:
            width, height = im.size
            if im.getexif().get(0x0112, 1) in _ROTATED_ORIENTATIONS:
                width, height = height, width
    except Exception as err:
        raise _describe_failure(path, "image", err) from err
    return height, width


def mask_size_message(image: Path, mask: Path, size: tuple[int, ...], mask_size: tuple[int, ...]) -> str:
    """The one-line problem for a mask whose ``(H, W)`` differs from its image's."""
    return (
        f"mask {mask} is {mask_size[1]}x{mask_size[0]} but its image {image} is {size[1]}x{size[0]}; "
        f"regenerate the mask at the image's size, or pass {SKIP_BAD}"
    )
