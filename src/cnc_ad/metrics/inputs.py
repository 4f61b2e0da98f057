"""Input conversion (numpy, torch, sequences) and ground-truth regions."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
STRUCTURE_8[1] = True
"""8-connectivity inside each image of a (N, H, W) stack (3x3 ones, as MVTec AD); nothing connects across images."""


def to_numpy(x: Any) -> np.ndarray:
    """Numpy view of a numpy array, torch tensor (any device) or sequence."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_scores(x: Any, name: str) -> np.ndarray:
    a = to_numpy(x)
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    elif not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if np.isnan(a).any():
        raise ValueError(f"{name} contain NaN; fix the model output or drop those samples before computing metrics")
    return a


def as_maps(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) float maps and bool masks; (N, 1, H, W) is squeezed; float masks are binarised at 0.5."""
    m = as_scores(maps, "maps")
    g = to_numpy(masks)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if g.ndim == 4 and g.shape[1] == 1:
        g = g[:, 0]
    if g.dtype != np.bool_:
        g = g >= 0.5 if np.issubdtype(g.dtype, np.floating) else g != 0
    if m.ndim != 3 or m.shape != g.shape:
        raise ValueError(
            f"maps {tuple(m.shape)} and masks {tuple(g.shape)} must both be (N, H, W) or (N, 1, H, W); resize the "
            "masks to the map size first"
        )
    return m, g


def as_labels(labels: Any, n: int) -> np.ndarray:
    y = to_numpy(labels).reshape(-1)
    if y.size != n:
        raise ValueError(f"{y.size} image labels for {n} image scores; give one 0/1 label per image")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("image labels must be 0 (normal) or 1 (anomalous)")
    return y.astype(bool)


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected ground-truth regions of (N, H, W) masks.

    Returns:
        (region size of each anomalous pixel, in ``masks[masks]`` order (int32), size of each region (int32)).
    """
    labels, n_regions = ndimage.label(masks, structure=STRUCTURE_8)
    region_of_pixel = labels[masks]
    sizes = np.bincount(region_of_pixel, minlength=n_regions + 1).astype(np.int32)
    return sizes[region_of_pixel], sizes[1:]
