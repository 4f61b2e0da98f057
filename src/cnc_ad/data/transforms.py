"""Resizing for the two evaluation protocols (docs/method.md, Evaluation).

- ``"ader"`` (ADer, followed by CNC's tables): the image is resized to ``S x S`` (bilinear); the mask is resized
  bilinearly to ``M x M`` and binarised at 0.5.
- ``"dinomaly"`` (Dinomaly): the image is resized to ``round(S * 448 / 392)`` and centre-cropped to ``S``; the mask is
  resized likewise to ``round(M * 448 / 392)``, centre-cropped to ``M`` and binarised at > 0.

Images stay in ``[0, 1]`` without mean/std normalisation: the model owns normalisation. NumPy and Pillow only (no
torch): a station that runs an exported model prepares its inputs with these functions too.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from cnc_ad.data.images import resize_mask
from cnc_ad.errors import DataError

PROTOCOLS = ("ader", "dinomaly")
DINOMALY_RATIO = 448 / 392


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown evaluation protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
    return protocol


def resize_side(size: int, protocol: str = "ader") -> int:
    """Side in pixels that an image (or mask) is resized to before the centre crop to ``size``."""
    return round(size * DINOMALY_RATIO) if check_protocol(protocol) == "dinomaly" else size


def center_crop(array: np.ndarray, size: int) -> np.ndarray:
    """Centre crop of the first two axes to ``size x size`` (offsets rounded like torchvision's CenterCrop)."""
    height, width = array.shape[:2]
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return array[top : top + size, left : left + size]


def prepare_image(image: Image.Image, size: int, protocol: str = "ader") -> np.ndarray:
    """Resize (and for ``"dinomaly"`` centre-crop) an RGB image.

    Returns:
        ``(size, size, 3)`` uint8 array.
    """
    side = resize_side(size, protocol)
    if image.size != (side, side):
        image = image.resize((side, side), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return center_crop(np.asarray(image, dtype=np.uint8), size)


def prepare_mask(mask: np.ndarray, size: int, protocol: str = "ader") -> np.ndarray:
    """Resize and binarise a ``(H, W)`` bool mask for a protocol.

    Returns:
        ``(size, size)`` float32 array of 0/1.
    """
    resized = resize_mask(mask, resize_side(size, protocol))
    if protocol == "dinomaly":
        return (center_crop(resized, size) > 0).astype(np.float32)
    return (resized > 0.5).astype(np.float32)


def to_chw(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in [0, 1] (what the model and an exported graph take)."""
    return np.ascontiguousarray(image.transpose(2, 0, 1)).astype(np.float32) / np.float32(255.0)
