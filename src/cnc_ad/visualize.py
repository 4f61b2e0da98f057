"""Pictures of anomaly maps: colour heatmaps, overlays on the input image, mask renderings and PNG/JPEG bytes.

Used by the HTML report (:mod:`cnc_ad.report`) and by batch prediction to write overlay images. Every function takes
and returns NumPy arrays: RGB images are ``(H, W, 3)`` uint8, anomaly maps ``(H, W)`` float (any scale), masks
``(H, W)`` bool or 0/1. The default colour map (turbo) is built in, so overlays need NumPy and Pillow only (a station
draws them without matplotlib); any other name comes from matplotlib's colormap registry (imported lazily).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

DEFAULT_CMAP = "turbo"
# matplotlib's "turbo" (Google's Turbo colormap, Apache-2.0) as 256 RGB triples: colouring through it equals
# matplotlib.colormaps["turbo"](values, bytes=True)[..., :3] exactly (tests/test_visualize.py checks it).
_TURBO_HEX = (
    "30123b31154232184a341b51351e5836215f37236538266c3929723a2c793b2f7f3c32853c358b3d37913e3a963f3d9c"
    "4040a14043a64145ab4148b0424bb5434eba4350be4353c24456c74458cb455bce455ed24560d64563d94666dd4668e0"
    "466be3466de64670e84673eb4675ed4678f0467af2467df4467ff64682f84584f94587fb4589fc448cfd438efd4291fe"
    "4193fe4096fe3f98fe3e9bfe3c9dfd3ba0fc39a2fc38a5fb36a8f934aaf833acf631aff52fb1f32db4f12bb6ef2ab9ed"
    "28bbeb26bde925c0e623c2e421c4e120c6df1ec9dc1dcbda1ccdd71bcfd41ad1d219d3cf18d5cc18d7ca17d9c717dac4"
    "17dcc217debf18e0bd18e1ba19e3b81ae4b61be5b41de7b11ee8af20e9ac22eba924eca627eda329eea02cef9d2ff09a"
    "32f19735f39438f4913bf48d3ff58a42f68746f7834af8804df97c51f97955fa7659fb725dfb6f61fc6c65fc6869fd65"
    "6dfd6271fd5f74fe5c78fe597cfe5680fe5384fe5087fe4d8bfe4b8efe4892fe4695fe4498fe429bfd409efd3ea1fc3d"
    "a4fc3ba6fb3aa9fb39acfa37aef937b1f836b3f835b6f735b9f534bbf434bef334c0f233c3f133c5ef33c8ee33caed33"
    "cdeb34cfea34d1e834d4e735d6e535d8e335dae236dde036dfde36e1dc37e3da37e5d838e7d738e8d538ead339ecd139"
    "edcf39efcd39f0cb3af2c83af3c63af4c43af6c23af7c039f8be39f9bc39f9ba38fab737fbb537fbb336fcb035fcae34"
    "fdab33fda932fda631fda330fea12ffe9e2efe9b2dfe982cfd952bfd9229fd8f28fd8c27fc8926fc8624fb8323fb8022"
    "fa7d20fa7a1ff9771ef8741cf7711bf76e1af66b18f56817f46516f36315f26014f15d13ef5a11ee5810ed550fec520e"
    "ea500de94d0de84b0ce6490be5460ae3440ae24209e04008de3e08dd3c07db3a07d93806d73606d63405d43205d23005"
    "d02f04ce2d04cb2b03c92903c72803c52602c32402c02302be2102bb1f01b91e01b61c01b41b01b11901ae1801ac1601"
    "a91501a61401a31201a011019d10019a0e01970d01940c01910b018e0a018b09018708018407018106027d05027a0402"
)
_TURBO = np.frombuffer(bytes.fromhex("".join(_TURBO_HEX)), np.uint8).reshape(256, 3)


def colorize(
    anomaly_map: np.ndarray, vmin: float | None = None, vmax: float | None = None, cmap: str = DEFAULT_CMAP
) -> np.ndarray:
    """Render an anomaly map as a colour heatmap.

    Args:
        anomaly_map: ``(H, W)`` anomaly scores; NaNs are drawn as ``vmin``.
        vmin: score drawn with the lowest colour (default: the map's minimum). Pass the same ``vmin``/``vmax`` to
            several maps to compare them on one scale.
        vmax: score drawn with the highest colour (default: the map's maximum). Scores outside ``[vmin, vmax]`` are
            clipped. A constant map takes the lowest colour.
        cmap: name of a matplotlib colormap (``"turbo"``, ``"jet"``, ``"inferno"`` ...).

    Returns:
        ``(H, W, 3)`` uint8 RGB heatmap.
    """
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"anomaly_map must be 2-D (H, W), got shape {values.shape}")
    finite = values[np.isfinite(values)]
    lo = float(vmin) if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(vmax) if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if vmin is None:
        lo = min(lo, hi)
    if vmax is None:
        hi = max(lo, hi)
    if hi < lo:
        raise ValueError(f"vmax ({hi}) must not be below vmin ({lo})")
    values = np.nan_to_num(values, nan=lo)
    # With hi == lo (a constant map) scores at or below lo take the lowest colour, scores above it the highest.
    normed = np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else (values > lo).astype(np.float32)
    if cmap == "turbo":  # matplotlib's lookup: index floor(x * 256), clipped to 255
        return _TURBO[np.minimum((normed * 256).astype(np.intp), 255)]
    try:
        import matplotlib
    except ImportError as err:
        raise ValueError(f"colour map {cmap!r} needs matplotlib (only turbo is built in)") from err
    rgba = matplotlib.colormaps[cmap](normed, bytes=True)  # (H, W, 4) uint8
    return np.ascontiguousarray(rgba[..., :3])


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = DEFAULT_CMAP,
) -> np.ndarray:
    """Blend a colour heatmap of ``anomaly_map`` over ``image``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB image.
        anomaly_map: ``(h, w)`` anomaly scores; resized (bilinear) to ``(H, W)`` when the sizes differ.
        alpha: weight of the heatmap, in ``[0, 1]`` (0 shows only the image, 1 only the heatmap).
        vmin: see :func:`colorize`.
        vmax: see :func:`colorize`.
        cmap: see :func:`colorize`.

    Returns:
        ``(H, W, 3)`` uint8 RGB image.
    """
    image = _as_rgb(image)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    height, width = image.shape[:2]
    heat = colorize(resize_map(anomaly_map, (height, width)), vmin=vmin, vmax=vmax, cmap=cmap)
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * heat.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


_STRIP_PIXELS = 1 << 22  # resize_map copies maps larger than this out of Pillow in strips


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an anomaly map with bilinear interpolation.

    Args:
        anomaly_map: ``(h, w)`` anomaly scores.
        size: target ``(height, width)``.

    Returns:
        ``(height, width)`` float32 map (the input itself, as float32, when the size already matches).
    """
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"anomaly_map must be 2-D (H, W), got shape {values.shape}")
    height, width = size
    if values.shape == (height, width):
        return values
    resized = Image.fromarray(values).resize((width, height), Image.Resampling.BILINEAR)
    if height * width <= _STRIP_PIXELS:
        return np.asarray(resized, dtype=np.float32)
    # A large map (a 12000 x 12000 photograph): copy it out in strips, so no second full-size temporary (tobytes) is
    # made; the values are the same.
    out = np.empty((height, width), np.float32)
    rows = max(1, _STRIP_PIXELS // width)
    for top in range(0, height, rows):
        out[top : top + rows] = np.asarray(resized.crop((0, top, width, min(height, top + rows))), dtype=np.float32)
    return out


def mask_to_rgb(
    mask: np.ndarray, color: tuple[int, int, int] = (255, 255, 255), background: tuple[int, int, int] = (0, 0, 0)
) -> np.ndarray:
    """Render a binary mask as an RGB image.

    Args:
        mask: ``(H, W)`` bool, or numbers where anything > 0 is foreground.
        color: RGB colour of the foreground.
        background: RGB colour of the background.

    Returns:
        ``(H, W, 3)`` uint8 RGB image.
    """
    mask = _as_bool_mask(mask)
    rgb = np.empty((*mask.shape, 3), dtype=np.uint8)
    rgb[...] = np.asarray(background, dtype=np.uint8)
    rgb[mask] = np.asarray(color, dtype=np.uint8)
    return rgb


def outline(
    image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 0, 0), width: int = 1
) -> np.ndarray:
    """Draw the boundary of a binary mask over an image (for example a ground-truth contour on an overlay).

    Args:
        image: ``(H, W, 3)`` uint8 RGB image.
        mask: ``(h, w)`` bool or 0/1 mask; resized (nearest) to ``(H, W)`` when the sizes differ.
        color: RGB colour of the boundary.
        width: boundary thickness in pixels, inside the mask region.

    Returns:
        ``(H, W, 3)`` uint8 RGB copy of ``image`` with the boundary drawn.
    """
    from scipy import ndimage

    image = _as_rgb(image)
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    height, image_width = image.shape[:2]
    region = _as_bool_mask(mask)
    if region.shape != (height, image_width):
        region = np.asarray(Image.fromarray(region).resize((image_width, height), Image.Resampling.NEAREST))
    inner = ndimage.binary_erosion(region, iterations=width, border_value=0)
    drawn = image.copy()
    drawn[region & ~inner] = np.asarray(color, dtype=np.uint8)
    return drawn


def to_png_bytes(array: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 RGB image or an ``(H, W)`` uint8/bool grey image as PNG."""
    buffer = io.BytesIO()
    _to_pil(array).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def to_jpeg_bytes(array: np.ndarray, quality: int = 85) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 RGB image or an ``(H, W)`` uint8 grey image as JPEG (``quality`` 1-95)."""
    buffer = io.BytesIO()
    _to_pil(array).save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def _to_pil(array: np.ndarray) -> Image.Image:
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"expected (H, W) or (H, W, 3) uint8, got {array.dtype} of shape {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array))


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.dtype} of shape {image.shape}")
    return image


def _as_bool_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    return mask > 0
