"""Scanners for the dataset layouts of the field, with format auto-detection.

Layouts (``format=`` names):

- ``"mvtec"``: MVTec AD and everything in its layout (MVTec-style VisA, BTAD, MPDD, our synthetic data):
  ``<cat>/train/good``, ``<cat>/test/<defect>/``, ``<cat>/ground_truth/<defect>/<stem>_mask.png``.
- ``"visa-raw"``: the VisA release, ``<cat>/Data/Images/{Normal,Anomaly}``, ``<cat>/Data/Masks/Anomaly``, split by the
  official ``split_csv/1cls.csv`` (columns ``object,split,label,image,mask``). ``"visa"`` is an alias that picks
  ``"visa-raw"`` for the raw release and ``"mvtec"`` for the MVTec-style conversion (``cnc data prepare-visa``).
- ``"mvtec-ad2"``: MVTec AD 2, ``<cat>/train/good``, ``<cat>/validation/good`` (split ``"validation"``),
  ``<cat>/test_public/{good,bad}``, ``<cat>/test_public/ground_truth/bad/<stem>_mask.png``. The unlabelled
  ``test_private*`` folders are not indexed: they are for ``cnc predict`` only.
- ``"realiad"``: Real-IAD, ``realiad_jsons/<cat>.json`` with ``train``/``test`` lists whose paths are relative to
  ``realiad_1024/<cat>`` (or ``realiad_512``, ``realiad_256``, ``realiad_raw``, or ``<cat>``); class ``"OK"`` = normal.
- ``"folder"``: one subfolder per category, each with ``good/`` (or ``normal/``, ``ok/``), optionally ``bad/`` (or
  ``abnormal/``, ``anomaly/``, ``defect/``, ``ng/``; subfolders of it are defect types) and ``masks/`` (or ``mask/``,
  ``ground_truth/``); a category folder with images only holds training images. Or one category given as
  ``normal=DIR, abnormal=DIR, masks=DIR``. Masks match images by stem (``x.png`` <-> ``x.png`` or ``x_mask.png``). When
  there are anomalous images, every fifth normal image (sorted by path) goes to the test set.
- ``"meta"``: the ``meta.json`` index of CLIP anomaly-detection repos (see :mod:`cnc_ad.data.prepare`).

Every problem is a one-line :class:`~cnc_ad.errors.DataError` naming the file and the fix; with ``skip_bad=True`` it
is logged and the sample skipped. Symbolic-link loops are walked once; non-UTF-8 file names are kept as they are.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cnc_ad.data.images import SKIP_BAD, decode_image, decode_mask, is_image_file, mask_size_message
from cnc_ad.data.samples import NORMAL_DEFECT, DatasetIndex, Sample
from cnc_ad.errors import DataError
from cnc_ad.progress import progress_bar

log = logging.getLogger(__name__)

FORMATS = ("mvtec", "visa", "visa-raw", "mvtec-ad2", "realiad", "folder", "meta")
VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
REALIAD_JSONS = "realiad_jsons"
REALIAD_IMAGE_DIRS = ("realiad_1024", "realiad_512", "realiad_256", "realiad_raw", ".")
META_FILE = "meta.json"
FOLDER_NORMAL = ("good", "normal", "ok")
FOLDER_ABNORMAL = ("bad", "abnormal", "anomaly", "anomalous", "defect", "defective", "ng")
FOLDER_MASKS = ("masks", "mask", "ground_truth", "gt")
FOLDER_TEST_EVERY = 5  # folder format: every fifth normal image is a test image when anomalous images exist
VISA_DEFECT = "bad"


class _Problems:
    """Raise each problem as a DataError, or log it and let the caller skip the sample when ``skip_bad``."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad = skip_bad
        self.skipped = 0

    def __call__(self, message: str) -> None:
        if not self.skip_bad:
            raise DataError(message if SKIP_BAD in message else f"{message}; or pass {SKIP_BAD}")
        self.skipped += 1
        log.warning("skipped: %s", message)


# --------------------------------------------------------------------------------------------------- file system


def _entries(folder: Path) -> list[os.DirEntry]:
    """Visible entries of ``folder`` sorted by name; unreadable folders raise DataError."""
    try:
        with os.scandir(folder) as it:
            return sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as err:
        raise DataError(
            f"cannot list folder {folder} ({err.strerror or err}); check that it exists and is readable"
        ) from err


def _is_dir(entry: os.DirEntry | Path) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # symbolic-link loop, permission
        return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _subdirs(folder: Path) -> list[Path]:
    if not _is_dir(folder):
        return []
    return [Path(e.path) for e in _entries(folder) if _is_dir(e)]


def _images(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (sorted; recursively with each real folder visited once, so link loops end)."""
    if not _is_dir(folder):
        return []
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    pending = [folder]
    while pending:
        current = pending.pop()
        try:
            stat = current.stat()
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            continue
        seen.add((stat.st_dev, stat.st_ino))
        entries = _entries(current)
        found.extend(Path(e.path) for e in entries if is_image_file(e.name) and _is_file(e))
        if recursive:
            pending.extend(Path(e.path) for e in reversed(entries) if _is_dir(e))
    return sorted(found)


def _has_images(folder: Path, depth: int = 2) -> bool:
    if not _is_dir(folder):
        return False
    entries = _entries(folder)
    if any(is_image_file(e.name) and _is_file(e) for e in entries):
        return True
    return depth > 0 and any(_has_images(Path(e.path), depth - 1) for e in entries if _is_dir(e) and not e.is_symlink())


def _mask_keys(mask: Path) -> list[str]:
    stem = mask.stem
    return [stem[: -len("_mask")], stem] if stem.endswith("_mask") else [stem]


def _match_masks(images: Sequence[Path], masks: Sequence[Path], where: str, problems: _Problems) -> dict[Path, Path]:
    """Pair images with masks by stem (``x`` <-> ``x`` or ``x_mask``); every image needs one, every mask an image.

    Returns:
        ``{image: mask}`` for the images that have a mask (all of them unless ``problems`` skips).
    """
    by_stem: dict[str, Path] = {}
    for image in images:
        if image.stem in by_stem:
            problems(
                f"two images with the stem {image.stem!r} in {where} ({by_stem[image.stem]}, {image}); "
                "rename one so masks can be matched by file name"
            )
            continue
        by_stem[image.stem] = image
    pairs: dict[Path, Path] = {}
    for mask in masks:
        owner = next((by_stem[k] for k in _mask_keys(mask) if k in by_stem), None)
        if owner is None:
            problems(
                f"mask {mask} has no image (expected {'/'.join(_mask_keys(mask))} with an image extension in "
                f"{where}); remove the mask or add its image"
            )
        elif owner in pairs:
            problems(f"image {owner} has two masks ({pairs[owner]}, {mask}); remove one")
        else:
            pairs[owner] = mask
    for image in by_stem.values():
        if image not in pairs:
            problems(
                f"image {image} has no mask in {where} (expected {image.stem}_mask.png or {image.stem}.png); "
                f"add the mask, remove the image, or pass {SKIP_BAD}"
            )
    return pairs


# --------------------------------------------------------------------------------------------------- detection


def _root_path(root: str | os.PathLike, what: str = "dataset root") -> Path:
    path = Path(root).expanduser()
    if not path.exists():
        hint = "pass the folder that holds the category folders" if what == "dataset root" else "check the path"
        raise DataError(f"{what} {path} does not exist; {hint}")
    return path


def detect_format(root: str | os.PathLike) -> str:
    """Guess the layout of the dataset at ``root`` (a folder, or a ``meta.json`` file).

    Raises:
        DataError: when no known layout is found.
    """
    root = _root_path(root)
    if root.is_file():
        if root.suffix.lower() == ".json":
            return "meta"
        raise DataError(f"dataset root {root} is a file; pass the dataset folder (or a meta.json index)")
    if _is_dir(root / REALIAD_JSONS):
        return "realiad"
    folders = [root, *_subdirs(root)]
    if (root / VISA_SPLIT_CSV).is_file() or any(_is_dir(d / "Data" / "Images") for d in folders[1:]):
        return "visa-raw"
    if any(_is_dir(d / "test_public") for d in folders):
        return "mvtec-ad2"
    if any(_is_dir(d / "train") or _is_dir(d / "test") for d in folders):
        return "mvtec"
    if (root / META_FILE).is_file():
        return "meta"
    if any(_has_images(d) for d in folders[1:]):
        return "folder"
    raise DataError(
        f"no dataset found under {root}: expected category folders in the MVTec AD, VisA, MVTec AD 2, Real-IAD or "
        "plain-folder layout (see `cnc data scan --help`); check the path or pass format=NAME"
    )


# --------------------------------------------------------------------------------------------------- scanners


def _category_dirs(root: Path, marker: Callable[[Path], bool]) -> list[Path]:
    """Category folders under ``root`` (those passing ``marker``); ``root`` itself when it is one category."""
    if marker(root):
        return [root]
    return [d for d in _subdirs(root) if marker(d)]


def _defect_samples(
    images: list[Path], category: str, defect: str, gt_dir: Path | None, problems: _Problems
) -> list[Sample]:
    """Test samples of one defect type; masks come from ``gt_dir`` when that folder exists."""
    if defect == NORMAL_DEFECT:
        return [Sample(p, category, "test", 0, NORMAL_DEFECT, None) for p in images]
    if gt_dir is None or not _is_dir(gt_dir):
        log.warning("%s/%s: no ground-truth folder; image metrics only, pixel metrics skip it", category, defect)
        return [Sample(p, category, "test", 1, defect, None) for p in images]
    pairs = _match_masks(images, _images(gt_dir), str(gt_dir), problems)
    return [Sample(p, category, "test", 1, defect, pairs[p]) for p in images if p in pairs]


def _check_category(category: str, folder: Path, samples: list[Sample], problems: _Problems) -> list[Sample]:
    if not samples:
        problems(f"category {category!r} ({folder}) has no images; add images or remove the folder")
    elif not any(s.split == "train" for s in samples):
        log.warning("category %r has no training images", category)
    elif not any(s.split == "test" for s in samples):
        log.info("category %r has no test images", category)
    return samples


def _scan_mvtec(root: Path, problems: _Problems, ad2: bool = False) -> list[Sample]:
    test_name = "test_public" if ad2 else "test"
    marker = (lambda d: _is_dir(d / test_name)) if ad2 else (lambda d: _is_dir(d / "train") or _is_dir(d / "test"))
    samples: list[Sample] = []
    for folder in _category_dirs(root, marker):
        category = folder.name
        found = [Sample(p, category, "train", 0, NORMAL_DEFECT, None) for p in _images(folder / "train" / "good")]
        found += [
            Sample(p, category, "validation", 0, NORMAL_DEFECT, None) for p in _images(folder / "validation" / "good")
        ]
        test_dir = folder / test_name
        gt_root = test_dir / "ground_truth" if ad2 else folder / "ground_truth"
        defect_dirs = [d for d in _subdirs(test_dir) if d.name != "ground_truth"]
        for defect_dir in defect_dirs:
            found += _defect_samples(
                _images(defect_dir), category, defect_dir.name, gt_root / defect_dir.name, problems
            )
        for orphan in _subdirs(gt_root):
            if orphan.name not in {d.name for d in defect_dirs}:
                for mask in _images(orphan):
                    problems(
                        f"mask {mask} has no image (no folder {test_dir / orphan.name}); remove the mask or "
                        "restore the images"
                    )
        if ad2 and any(d.name.startswith("test_private") for d in _subdirs(folder)):
            log.debug("%s: test_private* folders have no labels; use them with `cnc predict`", category)
        samples += _check_category(category, folder, found, problems)
    return samples


def _read_visa_csv(root: Path) -> list[dict[str, str]]:
    path = root / VISA_SPLIT_CSV
    if not path.is_file():
        raise DataError(
            f"VisA split file {path} not found; download split_csv/1cls.csv from "
            "https://github.com/amazon-science/spot-diff into the dataset root"
        )
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"cannot read VisA split file {path} ({err}); re-download split_csv/1cls.csv") from err
    needed = {"object", "split", "label", "image", "mask"}
    if not rows or not needed <= set(rows[0]):
        raise DataError(f"VisA split file {path} needs the columns {', '.join(sorted(needed))}; re-download it")
    return rows


def _scan_visa_raw(root: Path, problems: _Problems) -> list[Sample]:
    samples: list[Sample] = []
    for line, row in enumerate(_read_visa_csv(root), start=2):
        category, split, label = row["object"].strip(), row["split"].strip().lower(), row["label"].strip().lower()
        if split not in ("train", "test") or label not in ("normal", "anomaly"):
            problems(
                f"{root / VISA_SPLIT_CSV} line {line}: split must be train/test and label normal/anomaly, got "
                f"{split!r}/{label!r}; fix the line or re-download the file"
            )
            continue
        image = root / row["image"].strip()
        if not image.is_file():
            problems(f"image {image} (listed in {VISA_SPLIT_CSV} line {line}) does not exist; restore the file")
            continue
        if label == "normal":
            samples.append(Sample(image, category, split, 0, NORMAL_DEFECT, None))
            continue
        mask = root / row["mask"].strip() if row["mask"].strip() else None
        if mask is not None and not mask.is_file():
            problems(
                f"image {image} has no mask: {mask} (listed in {VISA_SPLIT_CSV} line {line}) does not exist; "
                f"restore it or pass {SKIP_BAD}"
            )
            continue
        samples.append(Sample(image, category, split, 1, VISA_DEFECT, mask))
    return samples


def _realiad_image_dir(root: Path, category: str) -> Path:
    for name in REALIAD_IMAGE_DIRS:
        if _is_dir(root / name / category):
            return root / name / category
    raise DataError(
        f"Real-IAD images of {category!r} not found in any of "
        f"{', '.join(str(root / n / category) for n in REALIAD_IMAGE_DIRS)}; "
        "unpack the category archive there"
    )


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"cannot read {what} {path} ({err}); re-download or regenerate it") from err
    if not isinstance(data, dict):
        raise DataError(f"{what} {path} must hold a JSON object with 'train' and 'test'; regenerate it")
    return data


def _scan_realiad(root: Path, problems: _Problems) -> list[Sample]:
    samples: list[Sample] = []
    json_dir = root / REALIAD_JSONS
    for json_path in sorted(p for p in _files_with_suffix(json_dir, ".json")):
        category = json_path.stem
        data = _read_json(json_path, "Real-IAD split file")
        base = _realiad_image_dir(root, category)
        for split in ("train", "test"):
            for i, item in enumerate(data.get(split) or []):
                try:
                    image = base / item["image_path"]
                    kind = str(item.get("anomaly_class", "OK"))
                    mask_rel = item.get("mask_path")
                except (TypeError, KeyError) as err:
                    problems(f"{json_path}: entry {i} of {split!r} lacks {err}; regenerate the file")
                    continue
                if not image.is_file():
                    problems(f"image {image} (listed in {json_path}) does not exist; restore the file")
                    continue
                if kind == "OK":
                    samples.append(Sample(image, category, split, 0, NORMAL_DEFECT, None))
                    continue
                mask = base / mask_rel if mask_rel else None
                if mask is not None and not mask.is_file():
                    problems(f"image {image} has no mask: {mask} (listed in {json_path}) does not exist; restore it")
                    continue
                samples.append(Sample(image, category, split, 1, kind, mask))
    return samples


def _files_with_suffix(folder: Path, suffix: str) -> list[Path]:
    return [Path(e.path) for e in _entries(folder) if e.name.lower().endswith(suffix) and _is_file(e)]


def _scan_meta(root: Path, meta: Path, problems: _Problems) -> list[Sample]:
    data = _read_json(meta, "meta.json index")
    samples: list[Sample] = []
    for split in ("train", "test"):
        groups = data.get(split) or {}
        if not isinstance(groups, dict):
            raise DataError(f"{meta}: {split!r} must map class names to lists; regenerate it with export-meta")
        for category, items in sorted(groups.items()):
            for i, item in enumerate(items or []):
                try:
                    image = root / item["img_path"]
                    label = int(item.get("anomaly", 0))
                    defect = str(item.get("specie_name") or (NORMAL_DEFECT if label == 0 else "bad"))
                    mask_rel = item.get("mask_path") or None
                except (TypeError, KeyError, ValueError) as err:
                    problems(f"{meta}: entry {i} of {split}/{category} is malformed ({err}); regenerate it")
                    continue
                if not image.is_file():
                    problems(f"image {image} (listed in {meta}) does not exist; restore the file or fix img_path")
                    continue
                mask = root / mask_rel if mask_rel and label else None
                if mask is not None and not mask.is_file():
                    problems(f"image {image} has no mask: {mask} (listed in {meta}) does not exist; restore it")
                    continue
                samples.append(
                    Sample(image, str(category), split, 1 if label else 0, defect if label else NORMAL_DEFECT, mask)
                )
    return samples


def _folder_category(
    category: str, normal: Path | None, abnormal: Path | None, masks: Path | None, problems: _Problems
) -> list[Sample]:
    normal_images = _images(normal, recursive=True) if normal is not None else []
    abnormal_images = _images(abnormal, recursive=True) if abnormal is not None else []
    samples: list[Sample] = []
    for i, image in enumerate(normal_images):
        test = bool(abnormal_images) and i % FOLDER_TEST_EVERY == FOLDER_TEST_EVERY - 1
        samples.append(Sample(image, category, "test" if test else "train", 0, NORMAL_DEFECT, None))
    if masks is not None and _is_dir(masks):
        pairs = _match_masks(abnormal_images, _images(masks, recursive=True), str(masks), problems)
    else:
        pairs = None
        if abnormal_images:
            log.warning("%s: no masks folder; image metrics only, pixel metrics skip it", category)
    for image in abnormal_images:
        if pairs is not None and image not in pairs:
            continue
        assert abnormal is not None  # there are abnormal images
        relative = image.relative_to(abnormal)
        defect = relative.parts[0] if len(relative.parts) > 1 else "bad"
        samples.append(Sample(image, category, "test", 1, defect, pairs.get(image) if pairs else None))
    return samples


def _pick(folder: Path, names: Iterable[str]) -> Path | None:
    lower = {d.name.lower(): d for d in _subdirs(folder)}
    return next((lower[n] for n in names if n in lower), None)


def _scan_folder(root: Path, problems: _Problems) -> list[Sample]:
    samples: list[Sample] = []
    for folder in _subdirs(root):
        normal, abnormal, masks = (_pick(folder, names) for names in (FOLDER_NORMAL, FOLDER_ABNORMAL, FOLDER_MASKS))
        if normal is None and abnormal is None:
            normal = folder  # images only: a category of training images
        found = _folder_category(folder.name, normal, abnormal, masks, problems)
        if found or _has_images(folder):
            samples += _check_category(folder.name, folder, found, problems)
    return samples


def _scan_explicit_folders(
    root: str | os.PathLike | None,
    categories: Sequence[str] | None,
    normal: str | os.PathLike,
    abnormal: str | os.PathLike | None,
    masks: str | os.PathLike | None,
    problems: _Problems,
) -> DatasetIndex:
    """One category from ``--normal/--abnormal/--masks``; named ``categories[0]``, else after ``root`` or the folder
    that holds ``normal``.
    """
    normal_dir = _root_path(normal, "normal folder")
    abnormal_dir = _root_path(abnormal, "abnormal folder") if abnormal is not None else None
    masks_dir = _root_path(masks, "masks folder") if masks is not None else None
    given = [Path(p).expanduser().absolute() for p in (normal_dir, abnormal_dir, masks_dir) if p is not None]
    root_path = Path(root).expanduser() if root is not None else Path(os.path.commonpath(given))
    name = categories[0] if categories else (root_path.name if root is not None else normal_dir.absolute().parent.name)
    name = name or "default"
    samples = _folder_category(name, normal_dir, abnormal_dir, masks_dir, problems)
    return DatasetIndex("folder", root_path, _sorted(_check_category(name, normal_dir, samples, problems)))


def scan_dataset(
    root: str | os.PathLike | None,
    format: str | None = None,
    categories: Sequence[str] | None = None,
    *,
    normal: str | os.PathLike | None = None,
    abnormal: str | os.PathLike | None = None,
    masks: str | os.PathLike | None = None,
    skip_bad: bool = False,
) -> DatasetIndex:
    """Index a dataset.

    Args:
        root: the dataset folder (or a ``meta.json`` file). May be None when ``normal`` is given.
        format: one of :data:`FORMATS`; None auto-detects (:func:`detect_format`).
        categories: keep only these categories (None = all found); an unknown name raises DataError.
        normal: folder of normal images (folder format, one category named after ``root`` or the folder's parent).
        abnormal: folder of anomalous images; its subfolders, if any, are defect types.
        masks: folder of masks for ``abnormal``, matched by stem.
        skip_bad: log and skip samples with problems (missing mask, mask without image, ...) instead of raising.

    Returns:
        The index, samples sorted by category, split, defect and path.

    Raises:
        DataError: one line naming the file and the fix.
    """
    problems = _Problems(skip_bad)
    if normal is not None:
        return _scan_explicit_folders(root, categories, normal, abnormal, masks, problems)
    if root is None:
        raise DataError("no dataset given; pass the dataset root folder (or normal=DIR for a plain folder)")
    if abnormal is not None or masks is not None:
        raise DataError("abnormal and masks folders need normal=DIR as well")
    root_path = _root_path(root)
    fmt = detect_format(root_path) if format is None else format
    if fmt not in FORMATS:
        raise DataError(f"unknown dataset format {fmt!r}; use one of {', '.join(FORMATS)}")
    if fmt == "visa":
        fmt = "visa-raw" if detect_format(root_path) == "visa-raw" else "mvtec"
    if fmt == "meta":
        meta = root_path if root_path.is_file() else root_path / META_FILE
        if not meta.is_file():
            raise DataError(f"{meta} not found; pass a meta.json file or a folder that holds one")
        root_path = meta.parent
        samples = _scan_meta(root_path, meta, problems)
    elif root_path.is_file():
        raise DataError(f"dataset root {root_path} is a file; pass the dataset folder (or a meta.json index)")
    elif fmt == "mvtec":
        samples = _scan_mvtec(root_path, problems)
    elif fmt == "mvtec-ad2":
        samples = _scan_mvtec(root_path, problems, ad2=True)
    elif fmt == "visa-raw":
        samples = _scan_visa_raw(root_path, problems)
    elif fmt == "realiad":
        if not _is_dir(root_path / REALIAD_JSONS):
            raise DataError(f"{root_path / REALIAD_JSONS} not found; pass the Real-IAD root that holds realiad_jsons/")
        samples = _scan_realiad(root_path, problems)
    else:
        samples = _scan_folder(root_path, problems)
    index = DatasetIndex(fmt, root_path, _sorted(samples))
    if categories is not None:
        unknown = sorted(set(categories) - set(index.categories))
        if unknown:
            raise DataError(
                f"categories {', '.join(unknown)} not found in {root_path}; found: "
                f"{', '.join(index.categories) or 'none'}"
            )
        index = index.subset(categories)
    if not index.samples:
        raise DataError(
            f"no images found in {root_path} (format {fmt}); check the path and the layout, or pass format=NAME"
        )
    if problems.skipped:
        log.warning("skipped %d problem(s) while scanning %s", problems.skipped, root_path)
    return index


_SPLIT_ORDER = {"train": 0, "validation": 1, "test": 2}


def _sorted(samples: list[Sample]) -> list[Sample]:
    return sorted(
        samples,
        key=lambda s: (s.category, _SPLIT_ORDER.get(s.split, 3), s.defect != NORMAL_DEFECT, s.defect, str(s.image)),
    )


# --------------------------------------------------------------------------------------------------- verification


def _verify_sample(sample: Sample) -> str | None:
    """Decode a sample's image and mask; return a one-line problem, or None when both are usable."""
    try:
        _, size = decode_image(sample.image)
        if sample.mask is not None:
            mask_size = decode_mask(sample.mask).shape
            if tuple(mask_size) != tuple(size):
                return mask_size_message(sample.image, sample.mask, size, mask_size)
    except DataError as err:
        return str(err)
    return None


def verify_index(
    index: DatasetIndex, *, skip_bad: bool = False, progress: bool = False, workers: int | None = None
) -> DatasetIndex:
    """Decode every image and mask of ``index`` and check that each mask has its image's size.

    Args:
        index: the scanned dataset.
        skip_bad: log and drop bad samples instead of raising.
        progress: show a progress bar on stderr.
        workers: decoding threads (default: up to 8).

    Returns:
        ``index`` without the bad samples (all of them when nothing is bad).

    Raises:
        DataError: for the first bad sample, unless ``skip_bad``.
    """
    problems = _Problems(skip_bad)
    workers = workers or min(8, os.cpu_count() or 1)
    kept: list[Sample] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(_verify_sample, index.samples)
        bar = progress_bar(
            zip(index.samples, results, strict=True),
            total=len(index.samples),
            desc="verify",
            unit="img",
            enabled=progress,
        )
        for sample, problem in bar:
            if problem is None:
                kept.append(sample)
            else:
                problems(problem)
    return index.subset(samples=kept)
