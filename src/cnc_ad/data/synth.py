"""A deterministic synthetic multi-class dataset in the MVTec AD layout.

Texture categories are cut from the real texture photographs that scikit-image bundles (``brick``, ``grass``,
``gravel``); object categories are procedural parts on a background with pose jitter (``washer``: a steel washer
with brass rivets, ``board``: a circuit board with chips and capacitors, ``gear``). Normal variation is the crop
position, flips, pose, lighting and sensor noise. Defects, each with an exact pixel mask:

- textures: ``scratch`` (a thin bent line), ``hole`` (a dark pit with a rim), ``stain`` (a translucent rust blob),
  ``cut`` (a patch cut from another texture photograph and pasted in);
- objects: ``missing_part`` (a rivet, component or tooth left out, exposing what was under it), ``extra_part`` (a
  stray hex nut lying on the part), ``scratch``, ``stain``.

Layout: ``<cat>/train/good/NNN.png`` (``per_category`` images), ``<cat>/test/good`` (``ceil(per_category / 4)``),
``<cat>/test/<defect>`` (``ceil(per_category / 8)`` per defect type, four types per category) and
``<cat>/ground_truth/<defect>/NNN_mask.png`` (0/255). Same arguments, same bytes: every image draws from its own
seeded generator and PNGs are written with fixed settings and no timestamps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cnc_ad.errors import DataError
from cnc_ad.progress import progress_bar

log = logging.getLogger(__name__)

# (scikit-image photograph, RGB tint, flips allowed)
TEXTURES: dict[str, tuple[str, tuple[float, float, float], bool]] = {
    "brick": ("brick", (1.0, 0.66, 0.52), False),
    "grass": ("grass", (0.66, 0.95, 0.48), True),
    "gravel": ("gravel", (0.96, 0.9, 0.8), True),
}
OBJECTS = ("washer", "board", "gear")
CATEGORIES = ("brick", "washer", "grass", "board", "gravel", "gear")  # `categories=K` takes the first K
TEXTURE_DEFECTS = ("scratch", "hole", "stain", "cut")
OBJECT_DEFECTS = ("missing_part", "extra_part", "scratch", "stain")
PASTE_SOURCES = ("brick", "grass", "gravel", "moon")
STAMP_FILE = ".cnc-synth.json"  # the arguments of the last complete run (hidden: scanners skip it)
SYNTH_VERSION = 1  # bump when the generator changes, so old datasets are rewritten
PNG_OPTIONS: dict[str, Any] = {"format": "PNG", "compress_level": 1, "optimize": False}

Scene = tuple[Image.Image, np.ndarray, np.ndarray | None]  # image, where defects may go (S, S) bool, missing part


def defects_of(category: str) -> tuple[str, ...]:
    """The four defect types of a synthetic category."""
    return TEXTURE_DEFECTS if category in TEXTURES else OBJECT_DEFECTS


def split_counts(per_category: int) -> tuple[int, int]:
    """``(good test images, test images per defect type)`` for ``per_category`` training images."""
    return max(1, math.ceil(per_category / 4)), max(1, math.ceil(per_category / 8))


@cache
def _photo(name: str) -> np.ndarray:
    """A scikit-image photograph as ``(H, W)`` float32 gray levels 0..255 (bundled with the package, no download)."""
    from skimage import data

    array = np.asarray(getattr(data, name)(), dtype=np.float32)
    return array.mean(axis=2) if array.ndim == 3 else array


def _texture(
    name: str, tint: Sequence[float] | np.ndarray, rng: np.random.Generator, size: int, flips: bool
) -> np.ndarray:
    """A random window of a photograph, resized to ``(size, size, 3)`` float32 RGB 0..255."""
    photo = _photo(name)
    side = round(0.6 * min(photo.shape))
    top, left = (int(rng.integers(0, n - side + 1)) for n in photo.shape)
    crop = photo[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if flips and rng.random() < 0.5:
        crop = crop[::-1]
    gray = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BILINEAR))
    return gray[..., None] * np.asarray(tint, np.float32) * rng.uniform(0.95, 1.05)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int = 8) -> np.ndarray:
    """Low-frequency noise ``(size, size)`` float32, about unit amplitude."""
    coarse = rng.normal(size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))


def _background(rng: np.random.Generator, size: int, color: Sequence[float]) -> Image.Image:
    """A plain surface with soft lighting variation."""
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    gradient = math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]
    shade = 1 + 0.06 * gradient + 0.04 * _smooth_noise(rng, size)
    rgb = np.asarray(color, np.float32) * shade[..., None] * rng.uniform(0.95, 1.05)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _polygon(cx: float, cy: float, rx: float, ry: float, angle: float, n: int = 32, jitter: np.ndarray | None = None):
    """Points of a rotated ellipse (or, with ``n`` small, a regular polygon); ``jitter`` scales each radius."""
    points = []
    for k in range(n):
        t = 2 * math.pi * k / n
        scale = 1.0 if jitter is None else float(jitter[k])
        x, y = rx * scale * math.cos(t), ry * scale * math.sin(t)
        points.append((cx + x * math.cos(angle) - y * math.sin(angle), cy + x * math.sin(angle) + y * math.cos(angle)))
    return points


def _rect(cx: float, cy: float, w: float, h: float, angle: float) -> list[tuple[float, float]]:
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in ((-w, -h), (w, -h), (w, h), (-w, h))]


def _to_board(cx: float, cy: float, angle: float, u: float, v: float) -> tuple[float, float]:
    return cx + u * math.cos(angle) - v * math.sin(angle), cy + u * math.sin(angle) + v * math.cos(angle)


def _footprint(size: int, draw: Callable[..., None]) -> np.ndarray:
    """Pixels that ``draw(ImageDraw)`` paints (its other arguments, if any, have defaults) as an (S, S) bool mask."""
    mask = Image.new("L", (size, size), 0)
    draw(ImageDraw.Draw(mask))
    return np.asarray(mask) > 0


# --------------------------------------------------------------------------------------------------- objects


def _pose(rng: np.random.Generator, size: int, max_angle: float) -> tuple[float, float, float, float]:
    """Centre x, y (pixels), rotation (radians) and scale of an object."""
    cx, cy = size / 2 + rng.normal(0, 0.025 * size, 2)
    return float(cx), float(cy), float(rng.uniform(-max_angle, max_angle)), float(rng.uniform(0.96, 1.04))


def _washer(rng: np.random.Generator, size: int, drop: bool) -> Scene:
    background = (68, 70, 76)
    image = _background(rng, size, background)
    cx, cy, angle, scale = _pose(rng, size, math.pi)
    s = size * scale
    draw = ImageDraw.Draw(image)
    draw.ellipse(_box(cx, cy, 0.345 * s), fill=(120, 122, 128))
    draw.ellipse(_box(cx, cy, 0.335 * s), fill=(172, 174, 182))
    draw.ellipse(_box(cx, cy, 0.16 * s), fill=(150, 152, 160))
    draw.ellipse(_box(cx, cy, 0.12 * s), fill=tuple(round(c * 0.9) for c in background))
    body = _footprint(size, lambda d: d.ellipse(_box(cx, cy, 0.33 * s), fill=255)) & ~_footprint(
        size, lambda d: d.ellipse(_box(cx, cy, 0.17 * s), fill=255)
    )
    count = 8
    dropped = int(rng.integers(count)) if drop else -1
    missing = None
    for k in range(count):
        t = angle + 2 * math.pi * k / count
        x, y = cx + 0.245 * s * math.cos(t), cy + 0.245 * s * math.sin(t)
        if k == dropped:  # an empty drilled hole shows the table through it
            missing = _footprint(size, lambda d, x=x, y=y: d.ellipse(_box(x, y, 0.04 * s), fill=255))
            draw.ellipse(_box(x, y, 0.034 * s), fill=(40, 40, 44))
            draw.ellipse(_box(x, y, 0.028 * s), fill=background)
            continue
        draw.ellipse(_box(x, y, 0.04 * s), fill=(150, 120, 60))
        draw.ellipse(_box(x, y, 0.034 * s), fill=(205, 172, 92))
        draw.ellipse(_box(x - 0.01 * s, y - 0.01 * s, 0.012 * s), fill=(240, 222, 160))
    return image, body, missing


def _board(rng: np.random.Generator, size: int, drop: bool) -> Scene:
    image = _background(rng, size, (52, 56, 64))
    cx, cy, angle, scale = _pose(rng, size, math.radians(5))
    s = size * scale
    draw = ImageDraw.Draw(image)
    draw.polygon(_rect(cx, cy, 0.41 * s, 0.31 * s, angle), fill=(22, 80, 44))
    draw.polygon(_rect(cx, cy, 0.40 * s, 0.30 * s, angle), fill=(30, 112, 62))
    body = _footprint(size, lambda d: d.polygon(_rect(cx, cy, 0.38 * s, 0.28 * s, angle), fill=255))
    for u0, v0, u1, v1 in ((-0.3, -0.2, 0.3, -0.2), (-0.3, 0.02, 0.32, 0.02), (-0.05, -0.25, -0.05, 0.25)):
        draw.line(
            [_to_board(cx, cy, angle, u0 * s, v0 * s), _to_board(cx, cy, angle, u1 * s, v1 * s)],
            fill=(190, 160, 70),
            width=max(1, round(size / 128)),
        )
    # (u, v, half width, half height, kind) in units of the board scale
    parts = [
        (-0.22, -0.1, 0.08, 0.055, "chip"),
        (0.14, -0.1, 0.08, 0.055, "chip"),
        (0.2, 0.16, 0.06, 0.06, "chip"),
        (-0.27, 0.14, 0.04, 0.022, "cap"),
        (-0.13, 0.14, 0.04, 0.022, "cap"),
        (0.0, 0.2, 0.04, 0.022, "cap"),
        (0.31, -0.18, 0.022, 0.04, "cap"),
    ]
    dropped = int(rng.integers(len(parts))) if drop else -1
    missing = None
    for k, (u, v, hw, hh, kind) in enumerate(parts):
        x, y = _to_board(cx, cy, angle, u * s, v * s)
        w, h = hw * s, hh * s
        if kind == "chip":
            for side in (-1, 1):  # solder pads under the legs
                pu, pv = u * s, v * s + side * (hh * s + 0.012 * s)
                draw.polygon(_rect(*_to_board(cx, cy, angle, pu, pv), w * 0.9, 0.014 * s, angle), fill=(196, 196, 188))
            outline = _rect(x, y, w, h + 0.02 * s, angle)
        else:
            for side in (-1, 1):
                pu, pv = (u * s + side * w * 0.7, v * s) if hw > hh else (u * s, v * s + side * h * 0.7)
                draw.polygon(
                    _rect(*_to_board(cx, cy, angle, pu, pv), 0.018 * s, 0.018 * s, angle), fill=(196, 196, 188)
                )
            outline = _rect(x, y, w, h, angle)
        if k == dropped:  # bare pads where the component should be
            missing = _footprint(size, lambda d, o=outline: d.polygon(o, fill=255))
            continue
        if kind == "chip":
            draw.polygon(outline, fill=(150, 150, 150))
            draw.polygon(_rect(x, y, w, h, angle), fill=(24, 24, 28))
            draw.ellipse(
                _box(*_to_board(cx, cy, angle, u * s - w * 0.6, v * s - h * 0.5), 0.008 * s), fill=(90, 90, 96)
            )
        else:
            draw.polygon(outline, fill=(206, 174, 120))
            draw.polygon(
                _rect(x, y, w * 0.55, h * 0.55, angle),
                fill=(170, 120, 70),
            )
    return image, body, missing


def _gear(rng: np.random.Generator, size: int, drop: bool) -> Scene:
    background = (196, 194, 188)
    image = _background(rng, size, background)
    cx, cy, angle, scale = _pose(rng, size, math.pi)
    s = size * scale
    draw = ImageDraw.Draw(image)
    count = 12
    dropped = int(rng.integers(count)) if drop else -1
    missing = None
    for k in range(count):
        t = angle + 2 * math.pi * k / count
        half = 0.36 * math.pi / count
        tooth = [
            (cx + r * s * math.cos(t + a), cy + r * s * math.sin(t + a))
            for r, a in ((0.26, -half * 1.2), (0.37, -half * 0.7), (0.37, half * 0.7), (0.26, half * 1.2))
        ]
        if k == dropped:
            missing = _footprint(size, lambda d, p=tooth: d.polygon(p, fill=255))
            continue
        draw.polygon(tooth, fill=(84, 88, 96))
    draw.ellipse(_box(cx, cy, 0.29 * s), fill=(84, 88, 96))
    draw.ellipse(_box(cx, cy, 0.2 * s), fill=(104, 108, 116))
    draw.ellipse(_box(cx, cy, 0.075 * s), fill=background)
    draw.polygon(_rect(*_to_board(cx, cy, angle, 0.085 * s, 0), 0.02 * s, 0.018 * s, angle), fill=background)
    if missing is not None:
        missing &= ~_footprint(size, lambda d: d.ellipse(_box(cx, cy, 0.29 * s), fill=255))
    body = _footprint(size, lambda d: d.ellipse(_box(cx, cy, 0.27 * s), fill=255)) & ~_footprint(
        size, lambda d: d.ellipse(_box(cx, cy, 0.1 * s), fill=255)
    )
    return image, body, missing


def _box(cx: float, cy: float, r: float) -> tuple[float, float, float, float]:
    return (cx - r, cy - r, cx + r, cy + r)


OBJECT_SCENES: dict[str, Callable[[np.random.Generator, int, bool], Scene]] = {
    "washer": _washer,
    "board": _board,
    "gear": _gear,
}


# --------------------------------------------------------------------------------------------------- defects


def _pick_point(rng: np.random.Generator, region: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(region)
    k = int(rng.integers(len(xs)))
    return float(xs[k]), float(ys[k])


def _contrast_color(image: Image.Image, x: float, y: float) -> tuple[int, int, int]:
    luminance = float(np.asarray(image.convert("L"))[int(y), int(x)])
    return (236, 234, 226) if luminance < 120 else (22, 20, 20)


def _scratch(image: Image.Image, rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    size = image.size[0]
    x, y = _pick_point(rng, region)
    heading = rng.uniform(0, 2 * math.pi)
    length = rng.uniform(0.18, 0.32) * size
    points = [(x, y)]
    for _ in range(4):
        heading += rng.normal(0, 0.25)
        x, y = x + length / 4 * math.cos(heading), y + length / 4 * math.sin(heading)
        points.append((x, y))
    width = max(2, round(size / 64))
    ImageDraw.Draw(image).line(points, fill=_contrast_color(image, *points[0]), width=width, joint="curve")
    return _footprint(size, lambda d: d.line(points, fill=255, width=width, joint="curve"))


def _blob(rng: np.random.Generator, size: int, region: np.ndarray, radius: tuple[float, float]) -> np.ndarray:
    x, y = _pick_point(rng, region)
    r = rng.uniform(*radius) * size
    jitter = 1 + 0.25 * np.convolve(rng.normal(size=24), np.ones(3) / 3, mode="same")
    polygon = _polygon(x, y, r, r * rng.uniform(0.6, 1.0), rng.uniform(0, math.pi), n=24, jitter=jitter)
    return _footprint(size, lambda d: d.polygon(polygon, fill=255))


def _blend(image: Image.Image, mask: np.ndarray, layer: np.ndarray, alpha: float) -> Image.Image:
    rgb = np.asarray(image, np.float32)
    rgb[mask] = (1 - alpha) * rgb[mask] + alpha * layer[mask]
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _stain(image: Image.Image, rng: np.random.Generator, region: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    size = image.size[0]
    mask = _blob(rng, size, region, (0.05, 0.09))
    color = np.array([(128, 66, 24), (60, 40, 110), (30, 30, 30)][int(rng.integers(3))], np.float32)
    layer = np.broadcast_to(color, (size, size, 3)) * (1 + 0.08 * _smooth_noise(rng, size, 16))[..., None]
    return _blend(image, mask, layer, 0.72), mask


def _hole(image: Image.Image, rng: np.random.Generator, region: np.ndarray) -> tuple[Image.Image, np.ndarray]:
    size = image.size[0]
    mask = _blob(rng, size, region, (0.04, 0.075))
    inner = mask & ~_dilate(~mask, max(1, size // 96))
    rgb = np.asarray(image, np.float32)
    rgb[mask] = rgb[mask] * 0.45 + 60  # a lighter rim, then a dark pit
    rgb[inner] = 18 + 10 * _smooth_noise(rng, size, 16)[inner][:, None]
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)), mask


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _cut(image: Image.Image, rng: np.random.Generator, region: np.ndarray, category: str):
    size = image.size[0]
    mask = _blob(rng, size, region, (0.07, 0.11))
    sources = [n for n in PASTE_SOURCES if n != TEXTURES.get(category, (category,))[0]]
    source = sources[int(rng.integers(len(sources)))]
    tint = rng.uniform(0.55, 1.05, 3)
    patch = _texture(source, tint, rng, size, True)
    return _blend(image, mask, patch, 1.0), mask


def _nut(image: Image.Image, rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    size = image.size[0]
    x, y = _pick_point(rng, region)
    r = rng.uniform(0.045, 0.06) * size
    hexagon = _polygon(x, y, r, r, rng.uniform(0, math.pi), n=6)
    draw = ImageDraw.Draw(image)
    draw.polygon(hexagon, fill=(196, 198, 204))
    draw.polygon(_polygon(x, y, r * 0.85, r * 0.85, rng.uniform(0, math.pi), n=6), fill=(170, 172, 178))
    draw.ellipse(_box(x, y, r * 0.45), fill=(40, 40, 44))
    return _footprint(size, lambda d: d.polygon(hexagon, fill=255))


def render(category: str, rng: np.random.Generator, size: int, defect: str | None = None):
    """Draw one image of a synthetic category.

    Args:
        category: one of :data:`CATEGORIES`.
        rng: the image's own random generator.
        size: side in pixels.
        defect: None for a normal image, else one of :func:`defects_of` ``(category)``.

    Returns:
        ``(image, mask)``: ``(size, size, 3)`` uint8 RGB and ``(size, size)`` bool (None for a normal image).
    """
    mask = None
    if category in TEXTURES:
        name, tint, flips = TEXTURES[category]
        image = Image.fromarray(np.clip(_texture(name, tint, rng, size, flips), 0, 255).astype(np.uint8))
        region = np.zeros((size, size), bool)
        margin = size // 8
        region[margin:-margin, margin:-margin] = True
        scene_missing = None
    else:
        image, region, scene_missing = OBJECT_SCENES[category](rng, size, defect == "missing_part")
    if defect in ("scratch",):
        mask = _scratch(image, rng, region)
    elif defect == "stain":
        image, mask = _stain(image, rng, region)
    elif defect == "hole":
        image, mask = _hole(image, rng, region)
    elif defect == "cut":
        image, mask = _cut(image, rng, region, category)
    elif defect == "extra_part":
        mask = _nut(image, rng, region)
    elif defect == "missing_part":
        mask = scene_missing
    elif defect is not None:
        raise DataError(f"unknown defect {defect!r} for synthetic category {category!r}; use {defects_of(category)}")
    noisy = np.asarray(image, np.float32) + rng.normal(0, 2.0, (size, size, 3))
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8), mask


def _resolve_categories(categories: int | Sequence[str]) -> list[str]:
    if isinstance(categories, int):
        if not 1 <= categories <= len(CATEGORIES):
            raise DataError(f"categories must be 1..{len(CATEGORIES)} (or names from {', '.join(CATEGORIES)})")
        return list(CATEGORIES[:categories])
    names = list(categories)
    unknown = [n for n in names if n not in CATEGORIES]
    if unknown or not names:
        raise DataError(f"unknown synthetic categories {unknown or names}; choose from {', '.join(CATEGORIES)}")
    return names


def synthesize(
    out: str | os.PathLike,
    categories: int | Sequence[str] = 4,
    per_category: int = 40,
    size: int = 256,
    seed: int = 0,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write a synthetic multi-class dataset in the MVTec AD layout.

    Args:
        out: output folder (created).
        categories: how many of :data:`CATEGORIES` (in order: textures and objects alternate), or their names.
        per_category: normal training images per category; the test set has ``ceil(N / 4)`` good images and
            ``ceil(N / 8)`` images of each of the four defect types.
        size: image side in pixels (>= 32).
        seed: the random seed; the same arguments give the same bytes.
        overwrite: replace category folders that already exist in ``out``. Without it, a folder that already holds
            exactly this dataset (same arguments, recorded in ``.cnc-synth.json``) is kept as it is, one written
            by an earlier run with other arguments is rewritten, and any other existing category folder raises.
        progress: show a progress bar on stderr.

    Returns:
        ``out`` as a Path.

    Raises:
        DataError: bad arguments, or ``out`` holds a category folder not written by this function and ``overwrite``
            is False.
    """
    names = _resolve_categories(categories)
    if per_category < 1 or size < 32:
        raise DataError(f"need per_category >= 1 and size >= 32, got {per_category} and {size}")
    out = Path(out)
    stamp = out / STAMP_FILE
    wanted = {"version": SYNTH_VERSION, "categories": names, "per_category": per_category, "size": size, "seed": seed}
    previous = _read_stamp(stamp)
    if previous == wanted and not overwrite and all((out / n).is_dir() for n in names):
        log.info("%s already holds this synthetic dataset; nothing to do", out)
        return out
    existing = [n for n in names if (out / n).exists()]
    if existing and previous is None and not overwrite:
        raise DataError(f"{out} already holds {', '.join(existing)}; choose an empty folder or pass overwrite=True")
    stamp.unlink(missing_ok=True)  # written again only once every file is complete
    earlier = previous.get("categories", []) if isinstance(previous, dict) else []
    for name in sorted(set(existing) | {n for n in earlier if n in CATEGORIES and (out / n).is_dir()}):
        shutil.rmtree(out / name)
    n_good, n_defect = split_counts(per_category)
    jobs: list[tuple[str, int, int, str | None, int, Path]] = []
    for name in names:
        c = CATEGORIES.index(name)
        jobs += [(name, c, 0, None, i, out / name / "train" / "good") for i in range(per_category)]
        jobs += [(name, c, 1, None, i, out / name / "test" / "good") for i in range(n_good)]
        for d, defect in enumerate(defects_of(name)):
            jobs += [(name, c, 2 + d, defect, i, out / name / "test" / defect) for i in range(n_defect)]
    for name, c, group, defect, i, folder in progress_bar(jobs, desc="synth", unit="img", enabled=progress):
        rng = np.random.default_rng([seed, c, group, i])
        image, mask = render(name, rng, size, defect)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png", **PNG_OPTIONS)
        if mask is not None:
            gt = out / name / "ground_truth" / defect
            gt.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(gt / f"{i:03d}_mask.png", **PNG_OPTIONS)
    stamp.write_text(json.dumps(wanted, sort_keys=True) + "\n", encoding="utf-8")
    log.info("wrote %d images of %d categories to %s", len(jobs), len(names), out)
    return out


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
