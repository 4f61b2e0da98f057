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
- :data:`~cnc_ad.thresholds.ALL` (images of any category): the same rules over every category's images pooled.

Training keeps a deterministic share of each category's good training images aside
(:func:`cnc_ad.data.samples.split_calibration`), and its callers set thresholds on them after the last checkpoint
(:func:`calibrate_after_training`); ``cnc calibrate`` does the same from any folders of good images, for a checkpoint
or an exported model. Thresholds are stored where the model's loader finds them (:func:`store_thresholds`), merged so
that the F1-max values of ``cnc eval`` are kept (see :mod:`cnc_ad.thresholds` for the precedence). NumPy only: a
station calibrates an exported model without torch.

The line loop: operators confirm parts good (a false alarm) or defective (a missed defect) on decisions a server
recorded (:mod:`cnc_ad.deploy.decisions`). :func:`feedback_images` gives the kept images of the parts confirmed good,
by category, to set thresholds from (with any other good images), and :func:`check_defects` says which of the parts
confirmed defective the new thresholds flag.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnc_ad.data.samples import Sample, held_out_by_category
from cnc_ad.deploy.decisions import Decision, confirmed
from cnc_ad.deploy.detector import Detector
from cnc_ad.deploy.tiling import TILES_RULE
from cnc_ad.errors import ConfigError, DataError
from cnc_ad.thresholds import (
    ALL,
    Threshold,
    Thresholds,
    false_alarm_rule,
    merge_thresholds,
    save_thresholds,
)

if TYPE_CHECKING:
    from cnc_ad.config import Config
    from cnc_ad.model import CNC

log = logging.getLogger(__name__)

MARGIN = 0.05
"""Below ``rate = 1 / n``: the threshold is ``max + MARGIN * (max - min)`` of the good scores (or map values)."""
PIXELS_PER_IMAGE = 4096
"""Map values kept per good image for the pixel threshold (every value of maps up to 64 x 64)."""
MIN_IMAGES = 5
"""The fewest good images a category's thresholds are set from, unless a caller says otherwise."""


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


# ------------------------------------------------------------------------------------------- with the model
def score_images(
    detector: Detector,
    paths: Sequence[str | os.PathLike],
    *,
    batch_size: int = 16,
    workers: int = 2,
    skip_bad: bool = False,
    per_image: int = PIXELS_PER_IMAGE,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N,) and sampled map values (N, K) of image files, scored exactly as prediction scores them (by tiles
    when the detector has a tiling).

    Raises:
        DataError: an unreadable file (unless ``skip_bad``, which leaves it out with a warning).
    """
    scores, values = [], []
    for outcome in detector.results(paths, batch_size=batch_size, workers=workers):
        if outcome.result is None:
            if not skip_bad:
                raise DataError(outcome.error or f"cannot read {outcome.name}")
            log.warning("skipped: %s", outcome.error)
            continue
        scores.append(outcome.result.score)
        values.append(sample_pixels(outcome.result.small_map[None], per_image, seed + outcome.index))
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
    workers: int = 2,
    skip_bad: bool = False,
    min_images: int = MIN_IMAGES,
) -> Thresholds:
    """Score good images with ``detector`` and set thresholds on them (:func:`normal_thresholds`); stores nothing.

    With a tiling, the thresholds hold for scores of those tiles only, and their rules say so (``";tiles=PX/S"``).

    Args:
        detector: the model.
        normal_images: per category, files of good images; the key None: good images of no known category.
        false_alarm_rate: share of good images the image thresholds call anomalous.
        pixel_false_alarm_rate: share of good pixels the pixel thresholds call anomalous (default: the same).
        batch_size: images (tiles) per model call.
        workers: image decoding threads.
        skip_bad: log and skip unreadable files instead of stopping.
        min_images: fewest good images a category needs.
    """
    check_rate(false_alarm_rate)
    scores: dict[str | None, np.ndarray] = {}
    maps: dict[str | None, np.ndarray] = {}
    for category, paths in normal_images.items():
        scores[category], maps[category] = score_images(
            detector, paths, batch_size=batch_size, workers=workers, skip_bad=skip_bad
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


def store_thresholds(
    detector: Detector,
    found: Thresholds,
    *,
    replace_labelled: bool = False,
    save_to: str | os.PathLike | None = None,
) -> tuple[Path, Thresholds]:
    """Store thresholds set for ``detector``'s model where it finds them next time, keeping F1-max values.

    Args:
        detector: the model they were set for; its :attr:`~cnc_ad.deploy.Detector.thresholds_file` is where they go
            (beside a checkpoint, or beside an exported graph), merged with the ones it decides by now
            (:func:`cnc_ad.thresholds.merge_thresholds`: F1-max values of ``cnc eval`` are kept).
        found: the new thresholds.
        replace_labelled: store the new values even where F1-max ones exist.
        save_to: write ``found`` alone to this file instead (nothing beside the model changes).

    Returns:
        the file written and the thresholds it holds; the detector decides by them from now on (unless ``save_to``).

    Raises:
        ConfigError: thresholds for tiled scoring without ``save_to`` (whole-image predictions read the stored ones).
    """
    if save_to is not None:
        return save_thresholds(save_to, found, file=True), found
    if any(TILES_RULE + "=" in t.rule for t in found.image.values()):
        raise ConfigError(
            "thresholds for tiled scoring hold for tiled scoring only, so they are not stored beside the model "
            "(whole-image predictions read those): save them to a file of their own and load that file with the "
            "tiling"
        )
    if detector.thresholds_file is None:
        raise ConfigError(f"the model {detector.source or '(in memory)'} has no place to store thresholds; save them")
    merged = merge_thresholds(detector.thresholds, found, replace_labelled=replace_labelled)
    path = save_thresholds(detector.thresholds_file, merged, file=True)
    detector.thresholds = merged
    return path, merged


def calibrate_after_training(
    checkpoint: str | os.PathLike, held_out: Sequence[Sample], config: Config, *, model: CNC | None = None
) -> Thresholds | None:
    """Set thresholds on the good training images held out by :func:`cnc_ad.data.samples.split_calibration` and
    store them beside the final checkpoint, at ``train.false_alarm_rate``; None (with a warning) when none were held
    out. Training's callers run it after :func:`cnc_ad.train.train` (training itself knows nothing of decisions).

    Args:
        checkpoint: the final checkpoint folder.
        held_out: the held-out samples.
        config: the training config (``data.*`` for decoding, ``eval.batch_size``, ``train.false_alarm_rate``).
        model: the trained model (:attr:`cnc_ad.train.TrainResult.model`, on its device); default: loaded from
            ``checkpoint``.
    """
    if not held_out:
        if config.data.calibration_share > 0:
            log.warning(
                "no good training image was held out (every category has fewer than 2 x data.calibration_min=%d), so "
                "no thresholds were set; set them from good images later (`cnc calibrate`) or evaluate the model",
                config.data.calibration_min,
            )
        return None
    if model is not None:
        from cnc_ad.deploy.backends import TorchBackend
        from cnc_ad.thresholds import load_thresholds, thresholds_path

        device = next(model.parameters()).device
        detector = Detector(
            TorchBackend(model, device),
            load_thresholds(checkpoint),
            source=str(checkpoint),
            thresholds_file=thresholds_path(checkpoint),
        )
    else:
        detector = Detector.load(checkpoint, device=config.train.device)
    found = calibrate_detector(
        detector,
        held_out_by_category(held_out),
        config.train.false_alarm_rate,
        batch_size=config.eval.batch_size,
        workers=config.data.num_workers,
        skip_bad=config.data.skip_bad,
        min_images=min(config.data.calibration_min, MIN_IMAGES),
    )
    store_thresholds(detector, found)
    log.info(
        "thresholds set on %d held-out good images at a false-alarm rate of %g (image threshold %.6g for any category)",
        len(held_out),
        config.train.false_alarm_rate,
        found.image[ALL].value,
    )
    return found


# ----------------------------------------------------------------------------------------------- the line loop
def feedback_images(
    folder: str | os.PathLike, *, category: str | None = None, skip_bad: bool = False
) -> dict[str | None, list[Path]]:
    """The kept images of the decisions in a decision log whose latest correction says the part is good, by the
    decisions' category (None: decided without one; such images set the shared threshold only).

    Args:
        folder: the decision log.
        category: only decisions of this category (None: all).
        skip_bad: leave out, with a warning, confirmed decisions whose image was not kept, instead of stopping.

    Raises:
        DataError: no decision was confirmed good, or their images were not kept (all of them; any, without
            ``skip_bad``).
    """
    goods = confirmed(folder, "good", category=category)
    of = f" of category {category}" if category is not None else ""
    if not goods:
        raise DataError(
            f"no decision{of} in {folder} was confirmed good: mark the false alarms (or good parts) on the server's "
            "page, or POST /v1/feedback with label good"
        )
    missing = [c.decision for c in goods if c.image is None]
    if missing:
        message = (
            f"{len(missing)} of the {len(goods)} decisions{of} confirmed good in {folder} have no kept image (the log "
            "kept none, keep='none', or its size cap removed them; e.g. "
            f"{missing[0].name}); keep them when serving (keep=anomalous keeps every false alarm's, keep=all every "
            "image)"
        )
        if not skip_bad or len(missing) == len(goods):
            raise DataError(message + ("" if len(missing) == len(goods) else ", or skip_bad=True to leave them out"))
        log.warning("%s; left out", message)
    images: dict[str | None, list[Path]] = {}
    for found in goods:
        if found.image is not None:
            images.setdefault(found.decision.category, []).append(found.image)
    return images


@dataclass(frozen=True)
class DefectCheck:
    """A decision an operator labelled defective, against the thresholds in use now.

    Attributes:
        decision: the decision as recorded.
        score: its score now: its kept image scored again, else the recorded score when the same model made it; None
            when neither is known.
        threshold: the image threshold its category is decided by now, or None.
    """

    decision: Decision
    score: float | None
    threshold: float | None

    @property
    def flagged(self) -> bool | None:
        """Whether it would be called anomalous now (None: not known)."""
        return None if self.score is None or self.threshold is None else self.score >= self.threshold


def check_defects(
    detector: Detector,
    folder: str | os.PathLike,
    thresholds: Thresholds,
    *,
    category: str | None = None,
    batch_size: int = 16,
) -> list[DefectCheck]:
    """The decisions in a decision log whose latest correction says the part is defective (of ``category``, None:
    all), each with its score now and the ``thresholds``' image threshold for its category.
    """
    checks = []
    for found in confirmed(folder, "defect", category=category):
        decision = found.decision
        score = decision.score if decision.model is not None and decision.model == detector.model_id else None
        if found.image is not None:
            (outcome,) = detector.results([found.image], batch_size=batch_size, workers=0)
            score = outcome.result.score if outcome.result is not None else score
        try:
            threshold = thresholds.select("image", decision.category)
        except ConfigError:  # a category the thresholds no longer know
            threshold = None
        checks.append(DefectCheck(decision, score, threshold))
    return checks
