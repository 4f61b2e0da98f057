"""Torch datasets over :class:`~cnc_ad.data.samples.Sample` lists, and a loader that handles bad files.

Items are dicts: ``image`` ``(3, S, S)`` float32 RGB in [0, 1] (not normalised: the model normalises), ``mask``
``(1, M, M)`` float32 0/1 (test sets only; zeros for normal images and defect types without masks), ``label`` int,
``index`` int (position in the dataset's sample list). A file that cannot be used does not raise inside a DataLoader
worker (torch would wrap the message in a traceback): its item carries an ``error`` string instead, and
:func:`make_loader` either drops it with one warning per file (``skip_bad``) or raises a one-line
:class:`~cnc_ad.errors.DataError` in the main process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from cnc_ad.data.images import SKIP_BAD, decode_image, decode_mask, mask_size_message
from cnc_ad.data.samples import Sample
from cnc_ad.data.transforms import check_protocol, prepare_image, prepare_mask, resize_side, to_chw
from cnc_ad.errors import DataError

log = logging.getLogger(__name__)

ERROR_KEY = "error"


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 tensor in [0, 1] (:func:`cnc_ad.data.transforms.to_chw`)."""
    return torch.from_numpy(to_chw(image))


def _bad(index: int, path: Path, err: DataError) -> dict[str, Any]:
    return {"index": index, "path": str(path), ERROR_KEY: str(err)}


class TrainDataset(Dataset):
    """Normal training images (all categories together for the unified multi-class model).

    Items: ``image`` ``(3, S, S)`` float32 in [0, 1], ``label`` int, ``index`` int; no mask.

    Args:
        samples: the training samples.
        image_size: side ``S`` in pixels.
        protocol: ``"ader"`` (resize) or ``"dinomaly"`` (resize to ``S * 448 / 392`` then centre-crop).
    """

    def __init__(self, samples: Sequence[Sample], image_size: int, protocol: str = "ader") -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self.protocol = check_protocol(protocol)

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, path: Path) -> tuple[torch.Tensor, tuple[int, int]]:
        image, size = decode_image(path, resize_side(self.image_size, self.protocol))
        return to_tensor(prepare_image(image, self.image_size, self.protocol)), size

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            image, _ = self._image(sample.image)
        except DataError as err:
            return _bad(index, sample.image, err)
        return {"image": image, "label": sample.label, "index": index, ERROR_KEY: ""}


class TestDataset(TrainDataset):
    """Labelled test images with masks.

    Items: ``image`` ``(3, S, S)`` float32 in [0, 1], ``mask`` ``(1, M, M)`` float32 0/1, ``label`` int, ``index`` int.
    A mask whose size differs from its image's is reported as a bad item.

    Args:
        samples: the test samples (one category, usually).
        image_size: image side ``S`` in pixels.
        mask_size: mask side ``M`` in pixels (the evaluation map size).
        protocol: ``"ader"``: masks resized bilinearly, binarised at 0.5; ``"dinomaly"``: resized to
            ``M * 448 / 392``, centre-cropped to ``M``, binarised at > 0.
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, samples: Sequence[Sample], image_size: int, mask_size: int, protocol: str = "ader") -> None:
        super().__init__(samples, image_size, protocol)
        self.mask_size = mask_size

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            image, size = self._image(sample.image)
        except DataError as err:
            return _bad(index, sample.image, err)
        if sample.mask is None:
            mask = np.zeros((self.mask_size, self.mask_size), np.float32)
        else:
            try:
                full = decode_mask(sample.mask)
            except DataError as err:
                return _bad(index, sample.mask, err)
            if full.shape != size:
                return _bad(
                    index, sample.mask, DataError(mask_size_message(sample.image, sample.mask, size, full.shape))
                )
            mask = prepare_mask(full, self.mask_size, self.protocol)
        return {
            "image": image,
            "mask": torch.from_numpy(mask)[None],
            "label": sample.label,
            "index": index,
            ERROR_KEY: "",
        }


class ImageFileDataset(TrainDataset):
    """Arbitrary image files for prediction.

    Items: ``image`` ``(3, S, S)`` float32 in [0, 1], ``path`` str, ``size`` ``(H, W)`` original size in pixels
    (EXIF orientation applied), ``index`` int.

    Args:
        paths: the image files.
        image_size: side ``S`` in pixels.
        protocol: as for :class:`TrainDataset`.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], image_size: int, protocol: str = "ader") -> None:
        super().__init__([], image_size, protocol)
        self.paths = [Path(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            image, size = self._image(path)
        except DataError as err:
            return _bad(index, path, err)
        return {"image": image, "path": str(path), "size": torch.tensor(size), "index": index, ERROR_KEY: ""}


def collate_items(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Collate good items as usual; bad ones go to ``errors`` as ``(index, message)`` pairs (never raises)."""
    good = [{k: v for k, v in item.items() if k != ERROR_KEY} for item in items if not item.get(ERROR_KEY)]
    batch: dict[str, Any] = default_collate(good) if good else {}
    batch["errors"] = [(item["index"], item[ERROR_KEY]) for item in items if item.get(ERROR_KEY)]
    return batch


class CheckedLoader(DataLoader):
    """A DataLoader whose batches have had their bad items handled in the main process.

    Bad items are dropped with one warning per file when ``skip_bad``; otherwise the first one raises DataError. A
    batch whose items were all bad is not yielded. Batches hold ``index`` (B,) so results map back to samples.
    """

    def __init__(self, *args: Any, skip_bad: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.skip_bad = skip_bad
        self.skipped: set[int] = set()

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        for batch in super().__iter__():
            errors = batch.pop("errors")
            for index, message in errors:
                if not self.skip_bad:
                    raise DataError(message if SKIP_BAD in message else f"{message}; or pass {SKIP_BAD}")
                if index not in self.skipped:
                    self.skipped.add(index)
                    log.warning("skipped: %s", message)
            if batch:
                yield batch


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    num_workers: int = 0,
    skip_bad: bool = False,
    sampler: Sampler | None = None,
    drop_last: bool = False,
    generator: torch.Generator | None = None,
) -> CheckedLoader:
    """A DataLoader over one of this module's datasets that turns bad files into a warning or a one-line DataError.

    Args:
        dataset: :class:`TrainDataset`, :class:`TestDataset` or :class:`ImageFileDataset`.
        batch_size: items per batch (a batch may be smaller when bad items are dropped).
        shuffle: reshuffle every epoch (not with ``sampler``).
        num_workers: worker processes (0 = load in the main process).
        skip_bad: drop bad files with one warning each instead of raising.
        sampler: e.g. a DistributedSampler.
        drop_last: drop the last incomplete batch.
        generator: the random generator for shuffling.

    Raises:
        DataError: while iterating, for the first bad file (unless ``skip_bad``).
    """
    return CheckedLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        num_workers=num_workers,
        sampler=sampler,
        drop_last=drop_last,
        generator=generator,
        collate_fn=collate_items,
        persistent_workers=False,
        skip_bad=skip_bad,
    )
