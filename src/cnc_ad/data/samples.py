"""Typed samples and the index a scanner returns.

A :class:`Sample` is one image with its category, split, label, defect type and optional mask. A
:class:`DatasetIndex` holds every sample of a dataset: the unified multi-class training set is the ``train`` samples of
all categories together (the CNC setting), while evaluation runs per category on the ``test`` samples.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from cnc_ad.errors import ConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
NORMAL_DEFECT = "good"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset.

    Attributes:
        image: path of the image file.
        category: product category (``"bottle"``, ``"pcb1"``, ...).
        split: ``"train"``, ``"validation"`` or ``"test"``.
        label: 0 normal, 1 anomalous.
        defect: defect type, ``"good"`` for normal images.
        mask: path of the ground-truth mask, or None (normal images, or a defect type without masks).
    """

    image: Path
    category: str
    split: str
    label: int
    defect: str
    mask: Path | None = None


@dataclass
class DatasetIndex:
    """Every sample of a scanned dataset.

    Attributes:
        format: the layout the samples were read from (``"mvtec"``, ``"visa-raw"``, ``"mvtec-ad2"``, ``"realiad"``,
            ``"folder"`` or ``"meta"``).
        root: the dataset root folder.
        samples: the samples, ordered by category, split, defect type and file name.
    """

    format: str
    root: Path
    samples: list[Sample] = field(default_factory=list)

    @property
    def categories(self) -> list[str]:
        """Sorted category names that have at least one sample."""
        return sorted({s.category for s in self.samples})

    def _select(self, split: str, category: str | None) -> list[Sample]:
        return [s for s in self.samples if s.split == split and (category is None or s.category == category)]

    def train_samples(self, category: str | None = None) -> list[Sample]:
        """Normal training images; with ``category=None`` those of every category (the unified training set)."""
        return self._select("train", category)

    def validation_samples(self, category: str | None = None) -> list[Sample]:
        """Validation images (MVTec AD 2 only; empty for other layouts)."""
        return self._select("validation", category)

    def test_samples(self, category: str | None = None) -> list[Sample]:
        """Labelled test images, of one category or of all."""
        return self._select("test", category)

    def counts(self) -> dict[str, dict[str, int]]:
        """Per category: ``train_good``, ``test_good``, ``test_anomalous`` and ``masks`` (test masks found)."""
        result = {c: {"train_good": 0, "test_good": 0, "test_anomalous": 0, "masks": 0} for c in self.categories}
        for s in self.samples:
            row = result[s.category]
            if s.split == "train":
                row["train_good"] += 1
            elif s.split == "test":
                row["test_anomalous" if s.label else "test_good"] += 1
                row["masks"] += s.mask is not None
        return result

    def subset(self, categories: Iterable[str] | None = None, samples: Iterable[Sample] | None = None) -> DatasetIndex:
        """A new index with only ``categories`` and/or only ``samples`` (same format and root)."""
        kept = list(self.samples if samples is None else samples)
        if categories is not None:
            wanted = set(categories)
            kept = [s for s in kept if s.category in wanted]
        return replace(self, samples=kept)


# ------------------------------------------------------------------------------------- calibration hold-out
def split_calibration(samples: Sequence[Sample], share: float, minimum: int) -> tuple[list[Sample], list[Sample]]:
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
    by_category: dict[str, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_category[sample.category].append(sample)
    held: list[Sample] = []
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


def held_out_by_category(samples: Sequence[Sample]) -> dict[str | None, list[Path]]:
    """``{category: [image path]}`` of samples (e.g. the held-out part of :func:`split_calibration`)."""
    grouped: dict[str | None, list[Path]] = defaultdict(list)
    for sample in samples:
        grouped[sample.category].append(Path(sample.image))
    return dict(grouped)
