"""Thresholds from good parts only: a target false-alarm rate on images known to be normal (issue #13).

Evaluation (:mod:`cnc_ad.evaluate`) finds F1-max thresholds, which need labelled defects. A new production line has
only good parts, so here a threshold is set where a chosen share of good images would be (falsely) flagged:

- image threshold of a category: the upper ``false_alarm_rate`` quantile of its good images' scores,
  ``np.quantile(scores, 1 - rate)`` with linear interpolation between order statistics (NumPy's default, Hyndman &
  Fan type 7). With ``n`` images, a rate below ``1 / n`` cannot be estimated (no good image lies above the quantile):
  then the threshold is the largest score plus :data:`MARGIN` times the spread of the scores (max - min), and its rule
  says so (``"false_alarm_rate=0.01;max+margin"``). Fewer than ``min_images`` good images raise an error.
- pixel threshold: the same quantile of the good images' anomaly-map values (a pixel false-alarm rate: that share of
  good pixels is marked). To bound memory, at most :data:`PIXELS_PER_IMAGE` values of each map are kept (all of them
  for maps of up to 64 x 64; else a seeded uniform random subset), see :func:`sample_pixels`.
- :data:`~cnc_ad.results.ALL` (images of any category): the same rules over every category's images pooled.

Training keeps a deterministic share of each category's good training images aside (:func:`split_calibration`) and
sets thresholds on them after the last checkpoint; ``cnc calibrate`` does the same from any folders of good images.
Thresholds are stored beside the checkpoint through :func:`cnc_ad.results.update_thresholds`, which keeps the
F1-max values of ``cnc eval`` where they exist (see :mod:`cnc_ad.results` for the precedence).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from cnc_ad.errors import ConfigError, DataError
from cnc_ad.results import ALL, FALSE_ALARM_RULE, Threshold, Thresholds

if TYPE_CHECKING:
    import torch

    from cnc_ad.config import Config
    from cnc_ad.inference import Detector, Tiling
    from cnc_ad.model import CNC

log = logging.getLogger(__name__)

MARGIN = 0.05
"""Below ``rate = 1 / n``: the threshold is ``max + MARGIN * (max - min)`` of the good scores (or map values)."""
PIXELS_PER_IMAGE = 4096
"""Map values kept per good image for the pixel threshold (every value of maps up to 64 x 64)."""
MIN_IMAGES = 5
"""The fewest good images a category's thresholds are set from, unless a caller says otherwise."""

S = TypeVar("S")


# -------------------------------------------------------------------------------------------------- the rule
def false_alarm_rule(rate: float, estimated: bool = True) -> str:
    """The ``rule`` recorded with a threshold: ``"false_alarm_rate=0.01"``, with ``";max+margin"`` when the rate
    was below ``1 / n`` (see the module docstring).
    """
    return f"{FALSE_ALARM_RULE}={rate:g}" + ("" if estimated else ";max+margin")


def check_rate(rate: float) -> float:
    """``rate`` when it lies in (0, 0.5), else ConfigError."""
    if not (isinstance(rate, (int, float)) and 0.0 < rate < 0.5):
        raise ConfigError(f"false-alarm rate {rate!r}: use a share of good images in (0, 0.5), e.g. 0.01")
    return float(rate)


def upper_quantile(values: np.ndarray, rate: float) -> tuple[float, bool]:
    """The value above which a share ``rate`` of ``values`` lies, and whether that share could be estimated.

    ``np.quantile(values, 1 - rate)`` (linear interpolation) when ``rate * n >= 1``; else the largest value plus
    :data:`MARGIN` times the spread (max - min), or times ``|max|`` when all values are equal (or 1e-6 when that is 0).

    Args:
        values: scores or map values, any shape (flattened); NaN values are ignored.
        rate: the share in (0, 0.5).

    Raises:
        DataError: no finite value.
    """
    flat = np.asarray(values, np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        raise DataError("no finite score to set a threshold from; check the good images and the model")
    if rate * flat.size >= 1.0:
        return float(np.quantile(flat, 1.0 - rate)), True
    high = float(flat.max())
    spread = high - float(flat.min())
    margin = MARGIN * (spread if spread > 0 else abs(high)) or 1e-6
    return high + margin, False


def normal_thresholds(
    scores_by_category: Mapping[str | None, np.ndarray],
    maps_by_category: Mapping[str | None, np.ndarray],
    false_alarm_rate: float,
    *,
    pixel_false_alarm_rate: float | None = None,
    min_images: int = MIN_IMAGES,
) -> Thresholds:
    """Image and pixel thresholds per category (and pooled under ``ALL``) from good images only.

    Args:
        scores_by_category: per category, the image scores ``(N,)`` of its good images; the key None holds images
            of no known category (they count for ``ALL`` only).
        maps_by_category: per category, their anomaly-map values ``(N, ...)`` (first axis: the same N images), whole
            maps or a subsample of each (:func:`sample_pixels`); every value given is used.
        false_alarm_rate: the share of good images called anomalous, in (0, 0.5).
        pixel_false_alarm_rate: the share of good pixels marked (default: ``false_alarm_rate``).
        min_images: a category (or the pool) with fewer good images raises.

    Returns:
        :class:`~cnc_ad.results.Thresholds` whose every value has ``rule`` :func:`false_alarm_rule` and ``images`` N.

    Raises:
        ConfigError: a rate outside (0, 0.5).
        DataError: a category with fewer than ``min_images`` images, or maps that do not match the scores.
    """
    rate = check_rate(false_alarm_rate)
    pixel_rate = check_rate(pixel_false_alarm_rate if pixel_false_alarm_rate is not None else rate)
    image: dict[str, Threshold] = {}
    pixel: dict[str, Threshold] = {}
    pooled_scores, pooled_maps = [], []
    for category, raw in scores_by_category.items():
        scores = np.asarray(raw, np.float64).ravel()
        given = maps_by_category.get(category)
        maps = np.asarray(given if given is not None else np.zeros((scores.size, 0)), np.float32)
        if maps.shape[:1] != scores.shape:
            raise DataError(f"category {category}: {scores.size} scores but maps of shape {maps.shape}")
        pooled_scores.append(scores)
        pooled_maps.append(maps.reshape(len(maps), -1))
        if category is None:
            continue
        _check_count(category, scores.size, min_images)
        image[category], pixel[category] = _pair(scores, maps, rate, pixel_rate)
        if rate * scores.size < 1.0:
            log.warning(
                "category %s: %d good images cannot show a false-alarm rate of %g (that needs at least %d); the "
                "image threshold is their largest score plus a margin",
                category,
                scores.size,
                rate,
                math.ceil(1 / rate),
            )
    if not pooled_scores:
        raise DataError("no good images to set thresholds from")
    scores = np.concatenate(pooled_scores)
    _check_count("(all categories)", scores.size, min_images)
    maps = np.concatenate([m.ravel() for m in pooled_maps])  # values only: categories may keep different counts
    image[ALL], pixel[ALL] = _pair(scores, maps, rate, pixel_rate)
    return Thresholds(image=image, pixel=pixel)


def _check_count(category: str, count: int, minimum: int) -> None:
    if count < minimum:
        raise DataError(
            f"category {category}: {count} good images, fewer than the {minimum} needed to set thresholds; add good "
            "images of it"
        )


def _pair(scores: np.ndarray, maps: np.ndarray, rate: float, pixel_rate: float) -> tuple[Threshold, Threshold]:
    value, estimated = upper_quantile(scores, rate)
    image = Threshold(value, false_alarm_rule(rate, estimated), int(scores.size))
    if maps.size == 0:
        return image, Threshold(math.nan, false_alarm_rule(pixel_rate), 0)
    pixel_value, pixel_estimated = upper_quantile(maps, pixel_rate)
    return image, Threshold(pixel_value, false_alarm_rule(pixel_rate, pixel_estimated), int(scores.size))


def sample_pixels(maps: np.ndarray, per_image: int = PIXELS_PER_IMAGE, seed: int = 0) -> np.ndarray:
    """At most ``per_image`` values of each map, for the pixel threshold: every value when a map has no more, else a
    uniform random subset without replacement (seeded: the same maps give the same values).

    Args:
        maps: anomaly maps (N, M, M).
        per_image: values kept per map.
        seed: the random seed.

    Returns:
        (N, min(M * M, per_image)) float32.
    """
    flat = np.asarray(maps, np.float32).reshape(len(maps), -1)
    if flat.shape[1] <= per_image:
        return flat
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.choice(flat.shape[1], per_image, replace=False) for _ in range(len(flat))])
    return np.take_along_axis(flat, picks, axis=1)


# ----------------------------------------------------------------------------------------------- the hold-out
def split_calibration(samples: Sequence[S], share: float, minimum: int) -> tuple[list[S], list[S]]:
    """Keep a deterministic share of each category's good training images aside for calibration.

    Per category, ``h = max(minimum, floor(share * n))`` images are held out, evenly spread over the images sorted
    by path (positions ``floor((i + 0.5) * n / h)``, i = 0..h-1: about every ``n / h``-th image); none when
    ``share == 0`` or the category has fewer than ``2 * minimum`` images (logged), so training keeps most of a
    small category. The same samples always give the same split, whatever their order.

    Args:
        samples: training samples with ``category`` and ``image`` (:class:`cnc_ad.data.Sample`).
        share: the share held out, in [0, 0.5].
        minimum: the fewest images held out per category (and half the fewest a category needs to hold any out).

    Returns:
        ``(train, held_out)``: the samples to train on (in their given order) and the held-out ones (by category,
        then path).
    """
    if not 0.0 <= share <= 0.5:
        raise ConfigError(f"calibration share {share!r}: use a value in [0, 0.5] (0 holds none out)")
    if share == 0.0:
        return list(samples), []
    by_category: dict[str, list[Any]] = defaultdict(list)
    for sample in samples:
        by_category[sample.category].append(sample)  # type: ignore[attr-defined]
    held: list[Any] = []
    for category in sorted(by_category):
        ordered = sorted(by_category[category], key=lambda s: str(s.image))
        n = len(ordered)
        if n < 2 * max(minimum, 1):
            log.info(
                "category %s: %d training images, fewer than 2 x data.calibration_min=%d: none held out for "
                "calibration (set thresholds later with `cnc calibrate`)",
                category,
                n,
                minimum,
            )
            continue
        count = max(minimum, math.floor(share * n))
        held += [ordered[math.floor((i + 0.5) * n / count)] for i in range(count)]
    kept = {id(s) for s in held}
    return [s for s in samples if id(s) not in kept], held


def held_out_by_category(samples: Sequence[Any]) -> dict[str | None, list[Path]]:
    """``{category: [image path]}`` of samples (e.g. the held-out part of :func:`split_calibration`)."""
    grouped: dict[str | None, list[Path]] = defaultdict(list)
    for sample in samples:
        grouped[sample.category].append(Path(sample.image))
    return dict(grouped)


# ------------------------------------------------------------------------------------------- with the model
def score_images(
    detector: Detector,
    paths: Sequence[str | os.PathLike],
    *,
    batch_size: int = 16,
    num_workers: int = 0,
    skip_bad: bool = False,
    per_image: int = PIXELS_PER_IMAGE,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N,) and sampled map values (N, K) of image files, preprocessed exactly as evaluation and prediction.

    Raises:
        DataError: an unreadable file (unless ``skip_bad``, which leaves it out with a warning).
    """
    from cnc_ad.data.dataset import ImageFileDataset, make_loader

    if detector.tiling is not None:
        return _score_tiled(detector, paths, batch_size, skip_bad, per_image, seed)
    dataset = ImageFileDataset(list(paths), detector.image_size)
    loader = make_loader(dataset, max(1, batch_size), num_workers=num_workers, skip_bad=skip_bad)
    scores, values = [], []
    for k, batch in enumerate(loader):
        batch_scores, maps = detector.score_batch(batch["image"])
        scores.append(np.asarray(batch_scores, np.float32))
        values.append(sample_pixels(maps, per_image, seed + k))
    if not scores:
        return np.zeros(0, np.float32), np.zeros((0, 0), np.float32)
    return np.concatenate(scores), np.concatenate(values)


def _score_tiled(
    detector: Detector,
    paths: Sequence[str | os.PathLike],
    batch_size: int,
    skip_bad: bool,
    per_image: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`score_images` for a detector with tiling: one image at a time at its own resolution."""
    scores, values = [], []
    for k, path in enumerate(paths):
        try:
            score, stitched = detector.score_tiled(detector.load_full(path), batch_size)
        except DataError as err:
            if not skip_bad:
                raise
            log.warning("skipped: %s", err)
            continue
        scores.append(score)
        values.append(sample_pixels(stitched[None], per_image, seed + k))
    if not scores:
        return np.zeros(0, np.float32), np.zeros((0, 0), np.float32)
    return np.asarray(scores, np.float32), np.concatenate(values)


def calibrate_detector(
    detector: Detector,
    normal_images: Mapping[str | None, Sequence[str | os.PathLike]],
    false_alarm_rate: float,
    *,
    pixel_false_alarm_rate: float | None = None,
    batch_size: int = 16,
    num_workers: int = 0,
    skip_bad: bool = False,
    min_images: int = MIN_IMAGES,
) -> Thresholds:
    """Score good images with ``detector`` and set thresholds on them (:func:`normal_thresholds`); stores nothing.

    Args:
        detector: the model.
        normal_images: per category, files of good images; the key None: good images of no known category.
        false_alarm_rate: share of good images the image thresholds call anomalous.
        pixel_false_alarm_rate: share of good pixels the pixel thresholds call anomalous (default: the same).
        batch_size: images per model call.
        num_workers: image decoding processes.
        skip_bad: log and skip unreadable files instead of stopping.
        min_images: fewest good images a category needs.
    """
    check_rate(false_alarm_rate)
    scores: dict[str | None, np.ndarray] = {}
    maps: dict[str | None, np.ndarray] = {}
    for category, paths in normal_images.items():
        scores[category], maps[category] = score_images(
            detector, paths, batch_size=batch_size, num_workers=num_workers, skip_bad=skip_bad
        )
        log.info("scored %d good images of %s", len(scores[category]), category or "no named category")
    found = normal_thresholds(
        scores, maps, false_alarm_rate, pixel_false_alarm_rate=pixel_false_alarm_rate, min_images=min_images
    )
    if detector.tiling is None:
        return found
    suffix = detector.tiling.rule_suffix()  # the thresholds hold for scores of these tiles only
    return Thresholds(
        **{
            kind: {c: dataclasses.replace(t, rule=t.rule + suffix) for c, t in found.table(kind).items()}
            for kind in ("image", "pixel")
        }
    )


def calibrate_checkpoint(
    checkpoint: str | os.PathLike,
    normal_images: Mapping[str | None, Sequence[str | os.PathLike]],
    false_alarm_rate: float,
    *,
    device: str | torch.device = "auto",
    batch_size: int = 16,
    pixel_false_alarm_rate: float | None = None,
    replace_labelled: bool = False,
    model: CNC | None = None,
    num_workers: int = 0,
    skip_bad: bool = False,
    min_images: int = MIN_IMAGES,
    tiling: Tiling | None = None,
    save_to: str | os.PathLike | None = None,
    **load: Any,
) -> Thresholds:
    """Set thresholds on good images and store them beside a checkpoint, keeping F1-max values from ``cnc eval``.

    Args:
        checkpoint: checkpoint folder, run folder or ``RUN/last``.
        normal_images: per category, files of good images (None: of no known category; they set ``ALL`` only).
        false_alarm_rate: the share of good images called anomalous, in (0, 0.5).
        device: ``"auto"`` or a torch device.
        batch_size: images per model call.
        pixel_false_alarm_rate: the share of good pixels marked (default: ``false_alarm_rate``).
        replace_labelled: store the new values even where F1-max ones exist (default: keep those).
        model: the checkpoint's model, already loaded (training passes its own); default: loaded from ``checkpoint``.
        num_workers: image decoding processes.
        skip_bad: leave unreadable files out with a warning instead of stopping.
        min_images: a category with fewer good images raises.
        tiling: score the images by tiles (:class:`~cnc_ad.inference.Tiling`); the thresholds then hold for tiled
            scoring only, and their rules say with which tiles. They need ``save_to``.
        save_to: write the thresholds found to this file instead of beside the checkpoint (nothing there changes).
        **load: ``clip_weights``, ``trust_pickle``, ``pretrained`` for :meth:`Detector.from_checkpoint`.

    Returns:
        The thresholds found now (the stored file may keep other values: see :func:`cnc_ad.results.update_thresholds`).
    """
    from cnc_ad.checkpoint import resolve_checkpoint
    from cnc_ad.device import resolve_device
    from cnc_ad.inference import Detector, TorchBackend
    from cnc_ad.results import save_thresholds, update_thresholds

    if tiling is not None and save_to is None:
        raise ConfigError(
            "thresholds for tiled scoring hold for tiled scoring only, so they are not stored beside the checkpoint "
            "(whole-image predictions read those): give a file for them (--save FILE), then `cnc predict --tile ... "
            "--thresholds FILE`"
        )
    folder = resolve_checkpoint(checkpoint)
    if model is not None:
        torch_device = resolve_device(device) if isinstance(device, str) else device
        detector = Detector(TorchBackend(model, torch_device), model.image_size, None, str(folder))
    else:
        detector = Detector.from_checkpoint(folder, device=device, **load)
    detector.tiling = tiling
    found = calibrate_detector(
        detector,
        normal_images,
        false_alarm_rate,
        pixel_false_alarm_rate=pixel_false_alarm_rate,
        batch_size=batch_size,
        num_workers=num_workers,
        skip_bad=skip_bad,
        min_images=min_images,
    )
    if save_to is not None:
        path = save_thresholds(save_to, found, file=True)
        log.info("wrote thresholds at false-alarm rate %g to %s", false_alarm_rate, path)
        return found
    stored = update_thresholds(folder, found, replace_labelled=replace_labelled)
    kept = [
        f"{kind} {category}"
        for kind in ("image", "pixel")
        for category, value in stored.table(kind).items()
        if category in found.table(kind) and value != found.table(kind)[category]
    ]
    if kept:
        log.info("kept the F1-max thresholds of `cnc eval` for %s (replace_labelled replaces them)", ", ".join(kept))
    log.info("stored thresholds at false-alarm rate %g beside %s", false_alarm_rate, folder)
    return found


def calibrate_after_training(
    checkpoint: str | os.PathLike,
    held_out: Sequence[Any],
    config: Config,
    *,
    model: CNC,
    device: torch.device,
) -> Thresholds | None:
    """Set thresholds on the good training images held out by :func:`split_calibration` and store them beside the
    final checkpoint, at ``train.false_alarm_rate``; None (with a warning) when none were held out.

    Args:
        checkpoint: the final checkpoint folder.
        held_out: the held-out samples.
        config: the training config (``data.*`` for decoding, ``eval.batch_size``, ``train.false_alarm_rate``).
        model: the trained model (not reloaded).
        device: where it runs.
    """
    if not held_out:
        if config.data.calibration_share > 0:
            log.warning(
                "no good training image was held out (every category has fewer than 2 x data.calibration_min=%d), so "
                "no thresholds were set; run `cnc calibrate --normal DIR` with good images, or `cnc eval`",
                config.data.calibration_min,
            )
        return None
    found = calibrate_checkpoint(
        checkpoint,
        held_out_by_category(held_out),
        config.train.false_alarm_rate,
        device=device,
        batch_size=config.eval.batch_size,
        model=model,
        num_workers=config.data.num_workers,
        skip_bad=config.data.skip_bad,
        min_images=min(config.data.calibration_min, MIN_IMAGES),
    )
    log.info(
        "thresholds set on %d held-out good images at a false-alarm rate of %g (image threshold %.6g for any category)",
        len(held_out),
        config.train.false_alarm_rate,
        found.image[ALL].value,
    )
    return found
