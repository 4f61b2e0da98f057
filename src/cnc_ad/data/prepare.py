"""Conversions between layouts: VisA raw -> MVTec AD layout, and the ``meta.json`` index.

``meta.json`` is the index used by CLIP anomaly-detection repositories (WinCLIP re-implementations, AnomalyCLIP,
AdaCLIP, ...)::

    {"train": {cat: [{"img_path": str, "mask_path": str, "cls_name": cat, "specie_name": defect, "anomaly": 0|1}]},
     "test": {...}}

with paths relative to the dataset root, ``mask_path`` ``""`` when there is no mask and ``specie_name`` ``"good"`` for
normal images. Validation images (MVTec AD 2) have no place in it and are left out.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from cnc_ad.data.images import decode_mask
from cnc_ad.data.samples import NORMAL_DEFECT, DatasetIndex, Sample
from cnc_ad.data.scan import META_FILE, scan_dataset
from cnc_ad.errors import DataError
from cnc_ad.progress import progress_bar

log = logging.getLogger(__name__)


def _empty_output(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"output folder {out} exists and is not empty; choose a new folder")


def _target_folder(sample: Sample) -> Path:
    if sample.split == "test" or sample.label:  # anomalies only ever belong in the test set
        return Path(sample.category) / "test" / sample.defect
    return Path(sample.category) / sample.split / NORMAL_DEFECT


def write_mvtec_layout(index: DatasetIndex, out: str | os.PathLike, *, progress: bool = False) -> Path:
    """Copy a dataset into the MVTec AD layout.

    Images are copied byte for byte (``<cat>/train/good``, ``<cat>/validation/good``, ``<cat>/test/<defect>``);
    masks are binarised and written as 0/255 PNGs at ``<cat>/ground_truth/<defect>/<stem>_mask.png``. Files whose
    names clash within a folder get a ``_<n>`` suffix.

    Args:
        index: the dataset to copy.
        out: a new (or empty) folder.
        progress: show a progress bar on stderr.

    Returns:
        ``out`` as a Path.

    Raises:
        DataError: ``out`` is not empty, a defect type mixes images with and without masks, or a file is unreadable.
    """
    out = Path(out)
    _empty_output(out)
    with_mask: dict[tuple[str, str], set[bool]] = {}
    for s in index.samples:
        if s.split == "test" and s.label:
            with_mask.setdefault((s.category, s.defect), set()).add(s.mask is not None)
    for (category, defect), kinds in with_mask.items():
        if len(kinds) > 1:
            raise DataError(
                f"{category}/{defect} mixes images with and without masks; add the missing masks first "
                "(`cnc data scan --verify` lists them)"
            )
    used: set[Path] = set()
    for sample in progress_bar(index.samples, desc="copy", unit="img", enabled=progress):
        folder = _target_folder(sample)
        stem, suffix = sample.image.stem, sample.image.suffix.lower()
        target, k = folder / f"{stem}{suffix}", 1
        while target in used:
            target, k = folder / f"{stem}_{k}{suffix}", k + 1
        used.add(target)
        (out / folder).mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(sample.image, out / target)
        except OSError as err:
            raise DataError(
                f"cannot copy {sample.image} to {out / target} ({err.strerror or err}); check both"
            ) from err
        if sample.mask is not None:
            mask_dir = out / sample.category / "ground_truth" / sample.defect
            mask_dir.mkdir(parents=True, exist_ok=True)
            mask = decode_mask(sample.mask).astype(np.uint8) * 255
            Image.fromarray(mask).save(mask_dir / f"{target.stem}_mask.png", format="PNG")
    log.info("wrote %d images of %d categories to %s", len(index.samples), len(index.categories), out)
    return out


def prepare_visa(raw: str | os.PathLike, out: str | os.PathLike, *, progress: bool = False) -> DatasetIndex:
    """Convert the raw VisA release into the MVTec AD layout with the official split (``split_csv/1cls.csv``).

    Normal images go to ``<cat>/train/good`` or ``<cat>/test/good``, anomalies to ``<cat>/test/bad`` with masks
    (binarised to 0/255) in ``<cat>/ground_truth/bad``.

    Returns:
        The index of the converted dataset.
    """
    index = scan_dataset(raw, format="visa-raw")
    write_mvtec_layout(index, out, progress=progress)
    return scan_dataset(out, format="mvtec")


def _relative(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def meta_index(index: DatasetIndex) -> dict[str, dict[str, list[dict]]]:
    """The ``meta.json`` dictionary of ``index`` (paths relative to ``index.root``)."""
    meta: dict[str, dict[str, list[dict]]] = {"train": {}, "test": {}}
    for s in index.samples:
        if s.split not in meta:
            continue
        meta[s.split].setdefault(s.category, []).append(
            {
                "img_path": _relative(s.image, index.root),
                "mask_path": _relative(s.mask, index.root) if s.mask is not None else "",
                "cls_name": s.category,
                "specie_name": s.defect,
                "anomaly": int(s.label),
            }
        )
    return meta


def export_meta(index: DatasetIndex, path: str | os.PathLike | None = None) -> Path:
    """Write the ``meta.json`` index of a dataset (default: ``<root>/meta.json``); return its path."""
    path = Path(path) if path is not None else index.root / META_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta_index(index), indent=2) + "\n", encoding="utf-8")
    return path


def import_meta(meta: str | os.PathLike, out: str | os.PathLike, *, progress: bool = False) -> DatasetIndex:
    """Materialise a dataset described by a ``meta.json`` file (paths relative to its folder) in the MVTec AD layout.

    Returns:
        The index of the written dataset.
    """
    index = scan_dataset(meta, format="meta")
    write_mvtec_layout(index, out, progress=progress)
    return scan_dataset(out, format="mvtec")
