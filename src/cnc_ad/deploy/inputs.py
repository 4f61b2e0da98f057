"""What a deployed model takes in: the one place that turns files, uploaded bytes, arrays, Pillow images and tensors
into model inputs, with NumPy and Pillow only (no torch: a station runs it too).

Every input is decoded to an RGB Pillow image (files and bytes by :mod:`cnc_ad.data.images`, the decoder of training
and evaluation, so a station scores the pixels the model was evaluated on) and prepared by
:func:`cnc_ad.data.transforms.prepare_image` (the ADer protocol: a bilinear resize of the whole image to ``S x S``),
then converted to ``(3, S, S)`` float32 in [0, 1]. Tiled scoring takes the whole image at its own resolution instead
(:func:`full_resolution`).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from cnc_ad.data.images import decode_image, decode_image_bytes, image_size, open_image
from cnc_ad.data.transforms import prepare_image, to_chw
from cnc_ad.errors import DataError

_ARRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "F")

# A torch tensor is accepted without importing torch: (3, H, W) or (B, 3, H, W) float RGB in [0, 1].
ImageInput = Union[str, os.PathLike, bytes, "Upload", Image.Image, np.ndarray, Any]


@dataclass(frozen=True)
class Upload:
    """An encoded image held in memory (an HTTP upload), with a name for messages."""

    data: bytes
    name: str = "upload"


class TooManyPixels(DataError):
    """An encoded image declares more pixels than the caller accepts (checked in its header, before decoding)."""


@dataclass(frozen=True)
class Picture:
    """One decoded input.

    Attributes:
        image: the RGB image; a large JPEG may be decoded at a reduced scale (still at least the target size).
        size: the input's own (oriented) size ``(H, W)`` in pixels: maps and masks are returned at this size.
        name: what messages call it (a path, an upload's name, or ``"array"`` and the like).
    """

    image: Image.Image
    size: tuple[int, int]
    name: str


def is_tensor(value: object) -> TypeGuard[Any]:
    """Whether ``value`` is a torch tensor (checked without importing torch)."""
    return type(value).__module__.startswith("torch") and hasattr(value, "detach")


def flatten_inputs(x: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """One input or a sequence of them as a list; a (B, 3, H, W) tensor is B inputs."""
    if is_tensor(x):
        if x.ndim == 4:
            return list(x)
        if x.ndim == 3:
            return [x]
        raise DataError(f"image tensors must be (B, 3, H, W) or (3, H, W); got {tuple(x.shape)}")
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]  # any other value is one input (a str path is not a sequence of inputs)


def describe(item: ImageInput) -> str:
    """What messages and records call an input: its path, an upload's name, or its type."""
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item) if isinstance(os.fspath(item), str) else repr(item)
    if isinstance(item, Upload):
        return item.name
    if isinstance(item, bytes):
        return "bytes"
    if isinstance(item, Image.Image):
        return "PIL image"
    return "tensor" if is_tensor(item) else "array"


def check_pixels(item: str | os.PathLike | Upload | bytes, max_pixels: int | None) -> int | None:
    """Refuse an encoded image whose header declares more than ``max_pixels`` pixels, before it is decoded.

    Returns:
        The pixels (width x height) its header declares; None when it is not an image (the decoder names the problem),
        or when ``max_pixels`` is None (nothing is read).

    Raises:
        TooManyPixels: naming the size and the limit.
    """
    if max_pixels is None:
        return None
    name = describe(item)
    if isinstance(item, (str, os.PathLike)):
        try:
            height, width = image_size(item)
        except DataError:
            return None
        declared, pixels = f"{width} x {height} pixels", width * height
    else:
        data = item.data if isinstance(item, Upload) else item
        try:
            with open_image(io.BytesIO(data), f"image {name}") as header:
                width, height = header.size
            declared, pixels = f"{width} x {height} pixels", width * height
        except Image.DecompressionBombError:  # beyond Pillow's own limit: certainly beyond ours
            raise TooManyPixels(
                f"image {name} has more pixels than Pillow's decompression-bomb limit, more than the limit of "
                f"{max_pixels}; downscale it"
            ) from None
        except (DataError, UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return None  # not an image, or a format not accepted: the decoder names the problem
    if pixels > max_pixels:
        raise TooManyPixels(f"image {name} has {declared}, more than the limit of {max_pixels}; downscale it")
    return pixels


def decode(item: ImageInput, *, target: int | None = None, max_pixels: int | None = None) -> Picture:
    """Decode one input to an RGB :class:`Picture`.

    Args:
        item: a path, encoded bytes (or an :class:`Upload`), a Pillow image, an (H, W) or (H, W, C) array (uint8,
            uint16, bool, or float in [0, 1]) or a (3, H, W) float tensor in [0, 1].
        target: the side the image will be resized to, if known: large JPEGs then decode at a reduced scale.
        max_pixels: refuse encoded images that declare more pixels than this (:class:`TooManyPixels`).

    Raises:
        DataError: an undecodable, empty or missing file, or an unsupported array.
    """
    name = describe(item)
    if isinstance(item, (str, os.PathLike)):
        check_pixels(item, max_pixels)
        image, size = decode_image(item, target)
        return Picture(image, size, name)
    if isinstance(item, (bytes, Upload)):
        check_pixels(item, max_pixels)
        data = item.data if isinstance(item, Upload) else item
        image, size = decode_image_bytes(data, target, name)
        return Picture(image, size, name)
    image = _in_memory_to_rgb(item)
    return Picture(image, (image.height, image.width), name)


def model_input(picture: Picture, side: int) -> np.ndarray:
    """A decoded input prepared for a model of input side ``side``: ``(3, S, S)`` float32 RGB in [0, 1]."""
    return to_chw(prepare_image(picture.image, side))


def prepare(item: ImageInput, side: int, *, max_pixels: int | None = None) -> tuple[np.ndarray, Picture]:
    """One input -> its model input ``(3, S, S)`` float32 in [0, 1] and the decoded :class:`Picture`.

    A ``(3, S, S)`` float tensor or array in [0, 1] (already prepared) passes through unchanged.

    Raises:
        DataError: the input cannot be read.
    """
    if is_tensor(item) and item.ndim == 3 and tuple(item.shape) == (3, side, side) and item.is_floating_point():
        item = item.detach().float().cpu().numpy()
    if isinstance(item, np.ndarray) and item.shape == (3, side, side) and np.issubdtype(item.dtype, np.floating):
        array = np.ascontiguousarray(item, dtype=np.float32)
        picture = Picture(Image.fromarray(_to_uint8(array.transpose(1, 2, 0))), (side, side), "array")
        return array, picture
    picture = decode(item, target=side, max_pixels=max_pixels)
    return model_input(picture, side), picture


def full_resolution(item: ImageInput, *, max_pixels: int | None = None) -> tuple[np.ndarray, Picture]:
    """One input at its own resolution, for tiled scoring: ``(H, W, 3)`` uint8 (one byte per value, however large
    the scan) and the decoded :class:`Picture`.

    Raises:
        DataError: the input cannot be read.
    """
    picture = decode(item, max_pixels=max_pixels)
    return np.asarray(picture.image, dtype=np.uint8), picture


# ----------------------------------------------------------------------------------------------- in memory
def _to_uint8(array: np.ndarray) -> np.ndarray:
    return np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)


def _array_to_image(array: np.ndarray) -> Image.Image:
    """An RGB Pillow image from an (H, W) or (H, W, C) array: uint8, uint16, bool, or float in [0, 1]."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise DataError(f"an image array must be (H, W) or (H, W, C) with C in 1, 3, 4; got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.round(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min(initial=0.0) < 0.0 or array.max(initial=0.0) > 1.0:
            raise DataError("a float image array must hold finite values in [0, 1]; divide uint8 data by 255")
        array = _to_uint8(array)  # 8 bits, like image files: one resize path for all
    elif array.dtype != np.uint8:
        raise DataError(f"image arrays must be uint8, uint16, bool or float in [0, 1]; got {array.dtype}")
    image = Image.fromarray(np.ascontiguousarray(array))
    return image if image.mode == "RGB" else image.convert("RGB")


def _in_memory_to_rgb(image: Any) -> Image.Image:
    """A tensor, Pillow image or array input as an RGB Pillow image (16-bit and float images scaled like arrays).

    Raises:
        DataError: an unsupported input type or array.
    """
    if is_tensor(image):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise DataError(f"image tensors must be (3, H, W) float RGB in [0, 1]; got {tuple(image.shape)}")
        return _array_to_image(image.detach().float().cpu().permute(1, 2, 0).numpy())
    if isinstance(image, Image.Image):
        if image.mode in _ARRAY_MODES:  # 16-bit and float images: scaled like arrays of the same dtype
            return _array_to_image(np.asarray(image))
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        return _array_to_image(image)
    raise DataError(
        f"cannot read a {type(image).__name__} as an image; pass a path, bytes, a PIL image, an array or a tensor"
    )
