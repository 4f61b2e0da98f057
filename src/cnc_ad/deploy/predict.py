"""Batch prediction on image files into a folder, crash-safe and resumable (what ``cnc predict`` runs).

One :class:`~cnc_ad.deploy.Detector` scores the files (:meth:`~cnc_ad.deploy.Detector.results`); each image's map, mask
and overlay are written before its ``predictions.jsonl`` line is appended, so an interruption loses at most the images
in flight, and ``resume`` skips the finished ones (a file is its path, size and modification time). Under ``torchrun``
the processes share the inputs and append to the same files; any other second writer is refused (the folder is locked
while one predictor or watcher runs).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import glob
import hashlib
import io
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from cnc_ad import distributed as dist
from cnc_ad.data.images import decode_image, is_image_file
from cnc_ad.deploy.decisions import DecisionLog
from cnc_ad.deploy.detector import Detector, ImageResult, ThresholdChoice
from cnc_ad.errors import ConfigError, DataError
from cnc_ad.files import append_jsonl, atomic_write_bytes, atomic_write_text, hold_lock, read_jsonl, repair_jsonl
from cnc_ad.progress import progress_bar
from cnc_ad.visualize import to_png_bytes

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
LOCK_FILE = ".lock"
ERRORS_FILE = "errors.jsonl"
SUMMARY_FILE = "predictions.csv"
MAP_DTYPES = ("float16", "float32")


# ------------------------------------------------------------------------------------------- batch prediction
def collect_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named by ``inputs``: files, folders (searched recursively) and glob patterns; no duplicates.

    Raises:
        DataError: an input names nothing, or nothing at all was found.
    """
    found: dict[Path, None] = {}
    for entry in inputs:
        text = os.fspath(entry)
        path = Path(text).expanduser()
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
        elif glob.has_magic(text):
            matches = []
            for hit in sorted(glob.glob(os.path.expanduser(text), recursive=True)):
                hit_path = Path(hit)
                if hit_path.is_dir():
                    matches += sorted(p for p in hit_path.rglob("*") if p.is_file() and is_image_file(p))
                elif hit_path.is_file():
                    matches.append(hit_path)
            if not matches:
                raise DataError(f"the pattern {text!r} matches no image file; check it (quote it for the shell)")
        else:
            raise DataError(f"input {text} does not exist; pass image files, folders or glob patterns")
        for match in matches:
            found.setdefault(match.resolve(), None)
    if not found:
        raise DataError("no image files found in the inputs; pass image files, folders or glob patterns")
    return list(found)


def output_name(path: Path) -> str:
    """A stable, collision-free file stem for an input: its stem plus a short hash of its absolute path."""
    digest = hashlib.sha1(os.fsencode(path)).hexdigest()[:10]  # the name's bytes: non-UTF-8 names too
    return f"{path.stem}-{digest}"


@dataclass(frozen=True)
class PredictionSummary:
    """What :func:`predict_files` did: counts of images predicted now, done before (resume), and failed."""

    out: Path
    predicted: int
    skipped: int
    failed: int
    anomalous: int

    @property
    def total(self) -> int:
        return self.predicted + self.skipped + self.failed


def predict_files(
    detector: Detector,
    paths: Sequence[Path],
    out: str | os.PathLike,
    *,
    batch_size: int = 16,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    category: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    workers: int = 2,
    map_dtype: str = "float16",
    overlay_max_side: int = 2048,
    progress: bool = True,
    decisions: DecisionLog | None = None,
) -> PredictionSummary:
    """Predict image files into a folder, crash-safely.

    Writes, under ``out``: ``maps/<name>.npy`` (the anomaly map at the image's own size, ``map_dtype``),
    ``masks/<name>.png`` (map >= pixel threshold; only with a threshold), ``overlays/<name>.png`` (heatmap over the
    image; its longer side at most ``overlay_max_side``); one ``predictions.jsonl`` line per image
    (``{"path", "score", "is_anomalous", "map", "mask", "overlay", "size", "mtime_ns"}``, files relative to ``out``;
    the input's size in bytes and modification time in ns), appended and fsynced after its files are written;
    ``errors.jsonl`` (``{"path", "error"}``) for files that cannot be decoded, which are skipped; and
    ``predictions.csv`` (from the JSON lines, written atomically at the end).
    ``<name>`` is the file stem plus a hash of its absolute path, so equal names from different folders never clash.
    With ``decisions``, each image's decision is also appended to that log, before its ``predictions.jsonl`` line,
    which then names it (``"decision"``: its id).

    Args:
        detector: the model.
        paths: image files (see :func:`collect_inputs`).
        out: output folder.
        batch_size: images per model call.
        threshold: image threshold (default: the stored one for ``category``); without any, ``is_anomalous`` is null.
        pixel_threshold: mask threshold (default: the stored one, else the image threshold); without any, no masks.
        category: use this category's stored thresholds.
        resume: skip images that ``predictions.jsonl`` records at their current size and modification time.
        overwrite: start a new ``predictions.jsonl``/``errors.jsonl`` when ``out`` already holds one.
        workers: image decoding threads.
        map_dtype: ``"float16"`` (half the disk) or ``"float32"`` for the ``.npy`` maps; masks use float32 maps.
        overlay_max_side: the longest side of an overlay PNG in pixels.
        progress: show a progress bar.
        decisions: a decision log to record every decision in (:class:`~cnc_ad.deploy.decisions.DecisionLog`).

    Raises:
        ConfigError: ``out`` already holds predictions and neither ``resume`` nor ``overwrite`` is set; another
            predictor or watcher writes into ``out``.
    """
    if map_dtype not in MAP_DTYPES:
        raise ConfigError(f"map dtype {map_dtype!r}; use one of {', '.join(MAP_DTYPES)}")
    out = Path(out)
    paths = [Path(p).resolve() for p in paths]  # records and output names key on absolute paths
    with open_output(out, resume=resume, overwrite=overwrite) as done:  # held until the end: one writer per folder
        # Under torchrun each process takes its share; all append to the same JSON-lines files (one write per line).
        jsonl = out / PREDICTIONS_FILE
        remaining = [p for p in paths if not done.has(str(p), file_version(p))]
        if dist.is_distributed():  # the first process's view: a file changing now must not split the shards
            remaining = dist.all_gather_objects(remaining)[0]
        skipped = len(paths) - len(remaining)
        todo = dist.shard(remaining)
        if skipped:
            log.info("resuming: %d of %d images already predicted", skipped, len(paths))
        choice = detector.choose_thresholds(threshold, pixel_threshold, category)
        if choice.image is None:
            log.warning("no threshold (evaluate the model, or give one): is_anomalous is null, no masks are written")

        predicted = failed = anomalous = 0
        bar = progress_bar(total=len(todo), desc="predict", unit="img", enabled=progress)
        try:
            for outcome in predict_stream(
                detector,
                todo,
                out,
                image_threshold=choice.image,
                pixel_threshold=choice.pixel,
                batch_size=batch_size,
                workers=workers,
                map_dtype=map_dtype,
                overlay_max_side=overlay_max_side,
                decisions=decisions,
                choice=choice,
                category=category,
            ):
                if outcome.record is None:
                    failed += 1
                else:
                    predicted += 1
                    anomalous += bool(outcome.record["is_anomalous"])
                bar.update(1)
        finally:
            bar.close()
            if not dist.is_distributed() and jsonl.exists():  # also after an interruption
                write_summary_csv(jsonl, out / SUMMARY_FILE)
        if dist.is_distributed():
            counts = np.sum(dist.all_gather_objects((predicted, failed, anomalous)), axis=0).tolist()
            predicted, failed, anomalous = (int(c) for c in counts)
            if dist.is_main_process() and jsonl.exists():
                write_summary_csv(jsonl, out / SUMMARY_FILE)
        return PredictionSummary(out, predicted, skipped, failed, anomalous)


@contextlib.contextmanager
def open_output(out: Path, *, resume: bool, overwrite: bool) -> Iterator[RecordedFiles]:
    """Open the output folder ``out`` for one predictor or watcher; yield what its ``predictions.jsonl`` records.

    The folder is locked while the ``with`` block runs (:func:`lock_output`). With ``resume``, a last line of
    ``predictions.jsonl`` or ``errors.jsonl`` cut short by a crash is cut off first (:func:`cnc_ad.files.repair_jsonl`):
    its image is not recorded, so it is predicted again.

    Raises:
        ConfigError: ``out`` already holds predictions and neither ``resume`` nor ``overwrite`` is set; another
            process writes into ``out``.
    """
    jsonl, errors_file = out / PREDICTIONS_FILE, out / ERRORS_FILE
    with lock_output(out):
        done = RecordedFiles()
        if resume and dist.is_main_process():  # a line cut short by a power loss would swallow the next one appended
            for appended in (jsonl, errors_file):
                repair_jsonl(appended)
        dist.barrier()
        if jsonl.exists() and jsonl.stat().st_size:
            if resume:
                done = recorded_files(out)
            elif not overwrite:
                raise ConfigError(f"{out} already holds predictions: resume them, or overwrite them to start afresh")
            dist.barrier()  # every process has read the old records before any is removed
            if overwrite and dist.is_main_process():
                jsonl.unlink()
                errors_file.unlink(missing_ok=True)
        for folder in ("maps", "masks", "overlays"):
            (out / folder).mkdir(parents=True, exist_ok=True)
        dist.barrier()
        yield done


@contextlib.contextmanager
def lock_output(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock file (``.lock``, with the holder's process id and host inside) while the block runs, so that
    two predictors or watchers never append to one folder.

    The processes of one ``torchrun`` job share the folder: the first takes the lock for all. Where ``fcntl`` is
    missing (Windows), or the file system takes no locks (some network shares; a warning says so), nothing is locked.

    Raises:
        ConfigError: another process holds the lock; the message names it.
    """
    out.mkdir(parents=True, exist_ok=True)
    fd: int | None = None
    refusal: str | None = None
    try:
        if dist.is_main_process():
            fd, holder = hold_lock(out / LOCK_FILE)
            if holder is not None:
                refusal = (
                    f"{out} is in use by another predictor or watcher ({holder}); stop it, or choose another output "
                    "folder"
                )
        if dist.is_distributed():
            refusal = dist.all_gather_objects(refusal)[0]  # every process of the job stops, not only the first
        if refusal is not None:
            raise ConfigError(refusal)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


FileVersion = tuple[int, int]
"""A version of a file: its size in bytes and modification time in ns (``size`` and ``mtime_ns`` in records)."""


def file_version(path: Path) -> FileVersion | None:
    """The version of the file at ``path`` now, or None when there is none."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


@dataclass
class RecordedFiles:
    """What ``predictions.jsonl`` records: each input path with the versions of it that were predicted.

    A file is identified by its path, size and modification time, so a new image written under the name of one
    already predicted (a camera that reuses its file names) is predicted again. A record without a version (written by
    0.1) stands for every version of its path: such files are not predicted again.
    """

    versions: dict[str, set[FileVersion | None]] = field(default_factory=dict)

    def add(self, record: dict[str, Any]) -> None:
        """Add one ``predictions.jsonl`` record."""
        path = record.get("path")
        if not isinstance(path, str):
            return
        size, mtime_ns = record.get("size"), record.get("mtime_ns")
        version = (size, mtime_ns) if isinstance(size, int) and isinstance(mtime_ns, int) else None
        self.versions.setdefault(path, set()).add(version)

    def has(self, path: str, version: FileVersion | None) -> bool:
        """Whether this version of the file at ``path`` was predicted."""
        versions = self.versions.get(path)
        return versions is not None and (None in versions or version in versions)

    def __len__(self) -> int:
        return len(self.versions)


def recorded_files(out: Path) -> RecordedFiles:
    """What ``out/predictions.jsonl`` records (a last line cut short by a crash does not count)."""
    done = RecordedFiles()
    for record in read_jsonl(out / PREDICTIONS_FILE):
        done.add(record)
    return done


@dataclass(frozen=True)
class Recorded:
    """One input recorded by :func:`predict_stream`: its record (appended and fsynced), or why it failed."""

    path: Path
    record: dict[str, Any] | None
    error: str | None = None


def predict_stream(
    detector: Detector,
    paths: Sequence[Path],
    out: Path,
    *,
    image_threshold: float | None,
    pixel_threshold: float | None,
    batch_size: int = 16,
    workers: int = 2,
    map_dtype: str = "float16",
    overlay_max_side: int = 2048,
    decisions: DecisionLog | None = None,
    choice: ThresholdChoice | None = None,
    category: str | None = None,
) -> Iterator[Recorded]:
    """Score ``paths`` (absolute) into ``out``, yielding each input's :class:`Recorded` once its line is on disk.

    A predicted image's map, mask and overlay are written (atomically) before its ``predictions.jsonl`` line (with the
    file's ``size`` and ``mtime_ns`` as they were before it was read) is appended and fsynced; a file that cannot be
    decoded gets an ``errors.jsonl`` line instead. So when an outcome is yielded, its line is durable: an interruption
    at any moment loses at most the images in flight.

    With ``decisions`` (and ``choice``, the thresholds as :meth:`~cnc_ad.deploy.Detector.choose_thresholds` chose
    them, and the ``category`` they were chosen for), each decision is appended to that log first and its id recorded
    as ``"decision"``: a crash between the two appends logs a decision that ``resume`` makes again (never one lost).
    """
    if decisions is not None and choice is None:
        raise ValueError("a decision log needs the choice of thresholds the decisions are made by")
    jsonl, errors_file = out / PREDICTIONS_FILE, out / ERRORS_FILE
    outputs = _Outputs(out, map_dtype, overlay_max_side)
    # Each file's version before it is read: a file rewritten while it is read is recorded as the older version, so
    # it is predicted again (never the other way round).
    versions = [file_version(Path(path)) for path in paths]
    for scored in detector.results(
        paths,
        batch_size=batch_size,
        workers=workers,
        threshold=image_threshold,
        pixel_threshold=pixel_threshold,
    ):
        path = Path(paths[scored.index])
        try:
            if scored.result is None:
                raise DataError(scored.error or f"cannot read {path}")
            record, drawn = _write_prediction(path, scored.result, outputs)  # DataError: changed or gone since decoded
            version = versions[scored.index]
            if version is not None:
                record["size"], record["mtime_ns"] = version
            if decisions is not None:
                assert choice is not None, "checked above"
                decision = decisions.record(  # DataError: gone since
                    scored.result,
                    choice,
                    name=str(path),
                    image=path,
                    category=category,
                    overlay=functools.partial(np.asarray, drawn),
                )
                record["decision"] = decision.id
        except DataError as err:
            log.warning("skipped: %s", err)
            append_jsonl(errors_file, {"path": str(path), "error": str(err)})
            yield Recorded(path, None, str(err))
            continue
        append_jsonl(jsonl, record)
        yield Recorded(path, record)


class _Outputs(NamedTuple):
    """Where and how :func:`_write_prediction` writes."""

    out: Path
    map_dtype: str
    overlay_max_side: int


def _write_prediction(path: Path, result: ImageResult, outputs: _Outputs) -> tuple[dict[str, Any], np.ndarray]:
    """Write one image's map, mask and overlay; return its ``predictions.jsonl`` record and the overlay."""
    out = outputs.out
    name = output_name(path)
    full = result.anomaly_map()  # (H, W) float32
    buffer = io.BytesIO()
    np.save(buffer, full.astype(outputs.map_dtype))
    map_rel = f"maps/{name}.npy"
    atomic_write_bytes(out / map_rel, buffer.getvalue())
    mask = result.mask(anomaly_map=full)
    mask_rel = None
    if mask is not None:
        mask_rel = f"masks/{name}.png"
        atomic_write_bytes(out / mask_rel, to_png_bytes(mask))
    overlay_rel = f"overlays/{name}.png"
    drawn = _overlay(path, result, outputs.overlay_max_side)
    atomic_write_bytes(out / overlay_rel, to_png_bytes(drawn))
    record = {
        "path": str(path),
        "score": result.score,
        "is_anomalous": result.is_anomalous,
        "map": map_rel,
        "mask": mask_rel,
        "overlay": overlay_rel,
    }
    return record, drawn


def _overlay(path: Path, result: ImageResult, max_side: int) -> np.ndarray:
    """The heatmap over the image (:meth:`~cnc_ad.deploy.detector.ImageResult.overlay`), at most ``max_side`` pixels
    on its longer side.
    """
    height, width = result.size
    scale = min(1.0, max_side / max(height, width))
    target = (max(1, round(height * scale)), max(1, round(width * scale)))
    image, _ = decode_image(path, max(target))  # JPEGs decode at a reduced scale: memory-safe for huge files
    if image.size != (target[1], target[0]):
        image = image.resize((target[1], target[0]), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return result.overlay(np.asarray(image, np.uint8))


def write_summary_csv(jsonl: str | os.PathLike, csv_path: str | os.PathLike) -> Path:
    """Write ``predictions.csv`` atomically from ``predictions.jsonl`` (one row per path, the last record wins)."""
    records = {record["path"]: record for record in read_jsonl(jsonl) if "path" in record}
    buffer = io.StringIO()
    fields = ["path", "score", "is_anomalous", "map", "mask", "overlay"]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records.values():
        writer.writerow({k: "" if record.get(k) is None else record.get(k) for k in fields})
    atomic_write_text(csv_path, buffer.getvalue())
    return Path(csv_path)
