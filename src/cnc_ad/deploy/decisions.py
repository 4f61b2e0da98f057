"""The decision log: every decision a station makes (served, predicted, watched) as one durable JSON line, the
corrections operators post, and, where asked, the image and its heatmap (the only module naming these files).

A log is a folder::

    decisions.jsonl        the current segment: one line per decision (:class:`Decision`), appended and fsynced
    decisions.<N>.jsonl    earlier segments (N = 1, 2, ...; a larger N is newer), renamed from decisions.jsonl once it
                           reached the segment size
    feedback.jsonl         corrections, one line each (:class:`Feedback`); the last one of a decision counts
    images/<id>.<ext>      kept images: the bytes as received (a file, an upload); decoded pixels as PNG
    overlays/<id>.jpg      their heatmap overlays (JPEG: a tenth of a PNG's size and time)
    .lock                  held by the one process writing into the folder (its process id and host inside)

A decision record (``Decision.to_json``)::

    {"id": 32 hex digits, "time": "2026-01-31T08:15:02.123Z" (UTC), "source": "serve" | "predict" | "watch",
     "model": the model's digest (Detector.model_id) or null, "category": str or null, "name": the file or upload name,
     "image_sha256": hex, "image_digest_of": "bytes" (the encoded file) | "pixels" (decoded uint8 RGB, C order),
     "score": float or null, "verdict": "anomalous" | "ok" | "none" (no threshold),
     "threshold": float or null, "threshold_source": "request" | "category" | "__all__" | null,
     "threshold_rule": e.g. "false_alarm_rate=0.01;max+margin", "f1_max", "request", or null,
     "threshold_images": the images behind the threshold or null, "pixel_threshold": float or null,
     "thresholds_digest": the digest of the thresholds file in use (Thresholds.digest) or null,
     "width": px, "height": px, "image": "images/<id>.png" or null, "overlay": "overlays/<id>.jpg" or null}

Readers ignore keys they do not know, so records may gain keys.

Crash safety follows :mod:`cnc_ad.files`: kept files are written atomically before their record, so a record never
names a half-written file; a record is one ``O_APPEND`` write, fsynced before :meth:`DecisionLog.record` returns (and
before a server answers); a last line cut short by a power loss is skipped by readers and cut off when the log is
opened again. A crash between the kept files and their record leaves files without a record, which the size cap
removes in time.

Size: ``max_bytes`` bounds the segments and kept files together (``feedback.jsonl`` is not counted). The current segment
is renamed to the next numbered one at ``segment_bytes``. Beyond the cap the oldest go first: kept files (their records
stay, naming files that are gone), then whole segments once they are older than every kept file.

Subscribers (:meth:`DecisionLog.subscribe`, :meth:`DecisionLog.subscribe_feedback`) are called with each decision or
correction once its line is on disk, in log order.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from cnc_ad.data.images import is_image_file, open_image
from cnc_ad.deploy.detector import ImageResult, ThresholdChoice
from cnc_ad.errors import ConfigError, DataError
from cnc_ad.files import append_jsonl, atomic_write_bytes, fsync_path, hold_lock, read_jsonl, repair_jsonl, sha256_file
from cnc_ad.visualize import to_jpeg_bytes, to_png_bytes

log = logging.getLogger(__name__)

LOG_FILE = "decisions.jsonl"
FEEDBACK_FILE = "feedback.jsonl"
IMAGES_DIR = "images"
OVERLAYS_DIR = "overlays"
LOCK_FILE = ".lock"
_SEGMENT = re.compile(r"decisions\.(\d+)\.jsonl")
_ID = re.compile(r"[0-9a-f]{32}")

Source = Literal["serve", "predict", "watch"]
Verdict = Literal["anomalous", "ok", "none"]
Keep = Literal["none", "anomalous", "all"]
Label = Literal["good", "defect"]
KeptKind = Literal["image", "overlay"]
SOURCES: tuple[str, ...] = get_args(Source)
VERDICTS: tuple[str, ...] = get_args(Verdict)
KEEPS: tuple[str, ...] = get_args(Keep)
LABELS: tuple[str, ...] = get_args(Label)

DEFAULT_MAX_BYTES = 1024 * 1024 * 1024
"""The default cap on a log's segments and kept files together (1 GiB)."""
RECENT = 1000
"""Decisions a writer keeps in memory (newest), for :meth:`DecisionLog.recent` and quick look-ups by id."""
_SEGMENT_BOUNDS = (64 * 1024, 64 * 1024 * 1024)  # the default segment size: max_bytes / 8 within these
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}


# --------------------------------------------------------------------------------------------------- records
def utc_now() -> str:
    """The current time as the log writes it: UTC, ISO 8601, milliseconds, ``Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    """An ISO 8601 time (``Z`` or an offset; without one: UTC) as an aware datetime.

    Raises:
        ValueError: not an ISO 8601 time.
    """
    value = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def verdict_of(is_anomalous: bool | None) -> Verdict:
    """``"anomalous"``, ``"ok"``, or ``"none"`` (no threshold, no decision)."""
    return "none" if is_anomalous is None else ("anomalous" if is_anomalous else "ok")


@dataclass(frozen=True)
class Decision:
    """One decision as the log records it (see the module docstring for the fields)."""

    id: str
    time: str
    source: str
    model: str | None
    category: str | None
    name: str
    image_sha256: str
    image_digest_of: str
    score: float | None
    verdict: str
    threshold: float | None
    threshold_source: str | None
    threshold_rule: str | None
    threshold_images: int | None
    pixel_threshold: float | None
    thresholds_digest: str | None
    width: int
    height: int
    image: str | None = None
    overlay: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Decision | None:
        """A decision from its record (unknown keys ignored, missing optional ones None), or None when the record is
        not one (no ``id``, ``time`` or ``verdict``).
        """
        if not all(isinstance(value.get(key), str) for key in ("id", "time", "verdict")):
            return None
        text, number, count = _optional(value, str), _optional(value, float), _optional(value, int)
        return cls(
            id=value["id"],
            time=value["time"],
            source=str(value.get("source") or ""),
            model=text("model"),
            category=text("category"),
            name=str(value.get("name") or ""),
            image_sha256=str(value.get("image_sha256") or ""),
            image_digest_of=str(value.get("image_digest_of") or ""),
            score=number("score"),
            verdict=value["verdict"],
            threshold=number("threshold"),
            threshold_source=text("threshold_source"),
            threshold_rule=text("threshold_rule"),
            threshold_images=count("threshold_images"),
            pixel_threshold=number("pixel_threshold"),
            thresholds_digest=text("thresholds_digest"),
            width=count("width") or 0,
            height=count("height") or 0,
            image=text("image"),
            overlay=text("overlay"),
        )

    @property
    def when(self) -> datetime:
        """:attr:`time` as an aware datetime (UTC)."""
        return parse_time(self.time)


@dataclass(frozen=True)
class Feedback:
    """An operator's correction of a decision.

    Attributes:
        decision: the decision's id.
        label: ``"good"`` (the part is good) or ``"defect"`` (it is defective).
        time: when it was given (UTC, ISO 8601).
        note: free text, or None.
        verdict: the decision's verdict, copied for subscribers.
        category: the decision's category, copied for subscribers.
    """

    decision: str
    label: str
    time: str
    note: str | None = None
    verdict: str | None = None
    category: str | None = None

    @property
    def correction(self) -> str | None:
        """``"false_alarm"`` (an anomalous verdict on a good part), ``"missed_defect"`` (an ok verdict on a defective
        one), or None (the verdict confirmed, or there was none).
        """
        if self.verdict == "anomalous" and self.label == "good":
            return "false_alarm"
        if self.verdict == "ok" and self.label == "defect":
            return "missed_defect"
        return None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Feedback | None:
        """A correction from its record, or None when the record is not one."""
        if not all(isinstance(value.get(key), str) for key in ("decision", "label", "time")):
            return None
        text = _optional(value, str)
        return cls(value["decision"], value["label"], value["time"], text("note"), text("verdict"), text("category"))


def _optional(record: Mapping[str, Any], kind: type) -> Callable[[str], Any]:
    """A reader of a record's optional field of ``kind``: its value, or None when missing or of another type (a
    number may be an int where a float is expected).
    """

    def read(key: str) -> Any:
        value = record.get(key)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value if isinstance(value, kind) and not isinstance(value, bool) else None

    return read


def decision_json(decision: Decision, feedback: Feedback | None) -> dict[str, Any]:
    """A decision's record with its latest correction under ``"feedback"`` (``{"label", "note", "time",
    "correction"}`` or null): what ``cnc decisions --json`` and ``GET /v1/decisions`` show.
    """
    shown = None
    if feedback is not None:
        shown = {
            "label": feedback.label,
            "note": feedback.note,
            "time": feedback.time,
            "correction": feedback.correction,
        }
    return {**decision.to_json(), "feedback": shown}


def image_digest(image: bytes | np.ndarray | Path) -> tuple[str, str]:
    """SHA-256 (hex) of an image and what it was taken of: ``"bytes"`` (an encoded file, or its path) or ``"pixels"``
    (a decoded array's bytes in C order).
    """
    if isinstance(image, Path):
        return sha256_file(image), "bytes"
    if isinstance(image, (bytes, bytearray, memoryview)):
        return hashlib.sha256(image).hexdigest(), "bytes"
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest(), "pixels"


def _suffix(data: bytes) -> str:
    """The file suffix of an encoded image's format (``.bin`` when it cannot be told)."""
    try:
        with open_image(io.BytesIO(data), "a kept image") as image:
            return _SUFFIXES.get(image.format or "", ".bin")
    except Exception:  # not an image this package reads: kept as it came
        return ".bin"


# ---------------------------------------------------------------------------------------------------- reading
def segments(folder: str | os.PathLike) -> list[Path]:
    """The log's segments, oldest first: the numbered ones, then the current one (those that exist)."""
    folder = Path(folder)
    numbered = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            match = _SEGMENT.fullmatch(entry.name)
            if match:
                numbered.append((int(match.group(1)), folder / entry.name))
    found = [path for _, path in sorted(numbered)]
    current = folder / LOG_FILE
    return [*found, current] if current.is_file() else found


def is_decision_log(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a decision log (a segment or a feedback file)."""
    return bool(segments(folder)) or (Path(folder) / FEEDBACK_FILE).is_file()


def read_decisions(folder: str | os.PathLike) -> Iterator[Decision]:
    """Every decision of a log, oldest first (a line cut short by a crash is skipped).

    Raises:
        DataError: ``folder`` holds no decision log.
    """
    if not is_decision_log(folder):
        raise DataError(f"{folder} holds no decision log ({LOG_FILE}); name the folder a server or predictor logs into")
    for path in segments(folder):
        for record in read_jsonl(path):
            decision = Decision.from_json(record) if isinstance(record, dict) else None
            if decision is not None:
                yield decision


def read_feedback(folder: str | os.PathLike) -> dict[str, Feedback]:
    """The latest correction of each decision of a log, by decision id."""
    found: dict[str, Feedback] = {}
    for record in read_jsonl(Path(folder) / FEEDBACK_FILE):
        feedback = Feedback.from_json(record) if isinstance(record, dict) else None
        if feedback is not None:
            found[feedback.decision] = feedback
    return found


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A point in time from an ISO 8601 time (UTC unless it says otherwise) or a span back from ``now``: ``90s``,
    ``30m``, ``2h``, ``3d``, ``1w`` (also combined: ``1d12h``).

    Raises:
        ConfigError: neither.
    """
    spec = text.strip().lower()
    parts = _RELATIVE.findall(spec)
    if parts and _RELATIVE.sub("", spec).strip() == "":
        span = timedelta(**{_UNITS[unit]: float(number) for number, unit in parts})
        return (now or datetime.now(timezone.utc)) - span
    try:
        return parse_time(text)
    except ValueError:
        raise ConfigError(
            f"since={text!r}: give an ISO 8601 time (2026-01-31T08:00, UTC unless it says otherwise) or a span back "
            "from now (90s, 30m, 2h, 3d, 1w)"
        ) from None


def select_decisions(
    decisions: Iterable[Decision],
    *,
    since: datetime | None = None,
    category: str | None = None,
    verdict: str | None = None,
) -> Iterator[Decision]:
    """The decisions made at or after ``since``, of ``category``, with ``verdict`` (None: any).

    Raises:
        ConfigError: an unknown verdict.
    """
    if verdict is not None and verdict not in VERDICTS:
        raise ConfigError(f"verdict {verdict!r}: use one of {', '.join(VERDICTS)}")
    for decision in decisions:
        if category is not None and decision.category != category:
            continue
        if verdict is not None and decision.verdict != verdict:
            continue
        if since is not None:
            try:
                if decision.when < since:
                    continue
            except ValueError:  # a time that is not ISO 8601 (edited by hand): not selected by time
                continue
        yield decision


def kept_path(folder: str | os.PathLike, decision: Decision, kind: KeptKind = "image") -> Path | None:
    """Where the kept image (or overlay) of ``decision`` lies, or None when not kept or gone (the size cap)."""
    relative = decision.image if kind == "image" else decision.overlay
    if not relative:
        return None
    root = Path(folder)
    path = root / relative
    expected = root / (IMAGES_DIR if kind == "image" else OVERLAYS_DIR)
    return path if path.parent == expected and path.is_file() else None  # only files of this log's folders


@dataclass(frozen=True)
class Confirmed:
    """A decision with the label an operator gave it, and its kept image (None when not kept, or gone)."""

    decision: Decision
    feedback: Feedback
    image: Path | None


def confirmed(folder: str | os.PathLike, label: Label, *, category: str | None = None) -> list[Confirmed]:
    """The decisions of a log whose latest correction is ``label`` (of ``category``, None: any), oldest first.

    Raises:
        DataError: ``folder`` holds no decision log.
    """
    labels = {id_: f for id_, f in read_feedback(folder).items() if f.label == label}
    found = []
    for decision in read_decisions(folder):
        feedback = labels.get(decision.id)
        if feedback is not None and (category is None or decision.category == category):
            found.append(Confirmed(decision, feedback, kept_path(folder, decision)))
    return found


# ---------------------------------------------------------------------------------------------------- writing
class UnknownDecision(DataError):
    """A correction names a decision the log does not hold."""


@dataclass
class _Segment:
    number: int
    path: Path
    size: int
    mtime_ns: int


@dataclass
class _Kept:
    decision: str
    paths: list[Path]
    size: int
    mtime_ns: int


class DecisionLog:
    """The writer of a decision log folder (one process at a time; the folder is locked until :meth:`close`).

    Args:
        folder: the log's folder (created when missing).
        source: who decides: ``"serve"``, ``"predict"`` or ``"watch"`` (every record says it).
        model: the model's identity (:attr:`cnc_ad.deploy.Detector.model_id`), or None.
        keep: which decisions keep their image and heatmap overlay: ``"none"``, ``"anomalous"`` or ``"all"``.
        max_bytes: the most bytes the segments and kept files take together; beyond, the oldest are removed.
        segment_bytes: the size at which the current segment is renamed to a numbered one (default: ``max_bytes / 8``,
            between 64 KiB and 64 MiB).

    Raises:
        ConfigError: an unknown source or keep, a cap below 1, or another process writes into ``folder``.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        source: Source,
        model: str | None = None,
        keep: Keep = "none",
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int | None = None,
    ) -> None:
        if source not in SOURCES:
            raise ConfigError(f"decision source {source!r}: use one of {', '.join(SOURCES)}")
        if keep not in KEEPS:
            raise ConfigError(f"keep={keep!r}: use one of {', '.join(KEEPS)}")
        if max_bytes < 1 or (segment_bytes is not None and segment_bytes < 1):
            raise ConfigError(f"the decision log's max_bytes and segment_bytes must be >= 1, got {max_bytes}")
        low, high = _SEGMENT_BOUNDS
        self.folder = Path(folder)
        self.source = source
        self.model = model
        self.keep = keep
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or min(high, max(low, max_bytes // 8))
        self._mutex = threading.Lock()
        self._subscribers: list[Callable[[Decision], None]] = []
        self._feedback_subscribers: list[Callable[[Feedback], None]] = []
        self._recent: OrderedDict[str, Decision] = OrderedDict()
        self._feedback: dict[str, Feedback] = {}
        self._segments: list[_Segment] = []
        self._kept: deque[_Kept] = deque()
        self._current_size = 0
        self._stored = 0  # bytes of the segments and kept files, the current segment included
        self._lock_fd: int | None = None
        self._open()

    # ------------------------------------------------------------------------------------------------- opening
    def _open(self) -> None:
        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        fd, holder = hold_lock(folder / LOCK_FILE)
        if holder is not None:
            raise ConfigError(f"the decision log {folder} is in use by another writer ({holder}); stop it, or log "
                              "into another folder")  # fmt: skip
        self._lock_fd = fd
        try:
            repair_jsonl(folder / LOG_FILE)  # a line cut short by a power loss would swallow the next one
            repair_jsonl(folder / FEEDBACK_FILE)
            for path in segments(folder):
                status = path.stat()
                if path.name != LOG_FILE:
                    number = int(_SEGMENT.fullmatch(path.name).group(1))  # type: ignore[union-attr]  # listed by it
                    self._segments.append(_Segment(number, path, status.st_size, status.st_mtime_ns))
                else:
                    self._current_size = status.st_size
            self._kept = deque(sorted(self._scan_kept(), key=lambda k: k.mtime_ns))
            self._stored = self._current_size + sum(s.size for s in self._segments) + sum(k.size for k in self._kept)
            self._feedback = read_feedback(folder)
            for path in reversed(segments(folder)):  # the newest decisions, into memory
                if len(self._recent) >= RECENT:
                    break
                records = [d for r in read_jsonl(path) if isinstance(r, dict) and (d := Decision.from_json(r))]
                for decision in reversed(records[-(RECENT - len(self._recent)) :]):
                    self._recent[decision.id] = decision
                    self._recent.move_to_end(decision.id, last=False)
            self._enforce_cap()
        except BaseException:
            self.close()
            raise
        log.info(
            "decision log %s: %d segment(s), %d kept image(s), %.1f of %.0f MiB; keep %s",
            folder,
            len(self._segments) + (self._current_size > 0),
            len(self._kept),
            self._stored / 2**20,
            self.max_bytes / 2**20,
            self.keep,
        )

    def _scan_kept(self) -> Iterator[_Kept]:
        """The kept files on disk, one entry per decision (its image and overlay); temporary files a crash left
        behind are removed.
        """
        found: dict[str, _Kept] = {}
        for name in (IMAGES_DIR, OVERLAYS_DIR):
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(self.folder / name):
                    if entry.name.startswith("."):  # an atomic write cut short
                        Path(entry.path).unlink(missing_ok=True)
                        continue
                    status = entry.stat()
                    kept = found.setdefault(entry.name.split(".")[0], _Kept(entry.name.split(".")[0], [], 0, 0))
                    kept.paths.append(Path(entry.path))
                    kept.size += status.st_size
                    kept.mtime_ns = max(kept.mtime_ns, status.st_mtime_ns)
        yield from found.values()

    def close(self) -> None:
        """Release the folder's lock (records are on disk already)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> DecisionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------- subscribing
    def subscribe(self, callback: Callable[[Decision], None]) -> Callable[[], None]:
        """Call ``callback(decision)`` after each decision's record is on disk; return a function that unsubscribes.

        Callbacks run in the thread that recorded the decision, one at a time, in log order, while the log waits:
        return quickly (hand the decision to a queue for network work). An exception in a callback is logged and
        ignored (the decision stands).
        """
        with self._mutex:
            self._subscribers.append(callback)
        return lambda: self._unsubscribe(self._subscribers, callback)

    def subscribe_feedback(self, callback: Callable[[Feedback], None]) -> Callable[[], None]:
        """Call ``callback(feedback)`` after each correction's record is on disk, as :meth:`subscribe` does."""
        with self._mutex:
            self._feedback_subscribers.append(callback)
        return lambda: self._unsubscribe(self._feedback_subscribers, callback)

    def _unsubscribe(self, callbacks: list[Any], callback: Any) -> None:
        with self._mutex, contextlib.suppress(ValueError):
            callbacks.remove(callback)

    def _notify(self, callbacks: list[Any], event: Decision | Feedback) -> None:
        for callback in list(callbacks):
            try:
                callback(event)
            except Exception:  # a subscriber's bug never costs a decision
                log.exception("a decision log subscriber failed on %s", getattr(event, "id", event))

    # -------------------------------------------------------------------------------------------------- writing
    def keeps(self, verdict: str) -> bool:
        """Whether a decision with ``verdict`` keeps its image and overlay."""
        return self.keep == "all" or (self.keep == "anomalous" and verdict == "anomalous")

    def record(
        self,
        result: ImageResult,
        thresholds: ThresholdChoice,
        *,
        name: str,
        image: bytes | np.ndarray | Path,
        category: str | None = None,
        overlay: Callable[[], np.ndarray] | None = None,
    ) -> Decision:
        """Append one decision, durably; keep its image and overlay when :attr:`keep` says so.

        Args:
            result: the decision (:meth:`cnc_ad.deploy.Detector.decide`).
            thresholds: the thresholds it was made by (:meth:`cnc_ad.deploy.Detector.choose_thresholds`).
            name: the image's name (a path, an upload's name).
            image: the encoded bytes as received, the file, or the decoded pixels ``(H, W, 3)`` uint8: its digest
                is taken of it, and it is what is kept.
            category: the category it was decided for, or None.
            overlay: draws the heatmap overlay ``(H', W', 3)`` uint8 (:meth:`~cnc_ad.deploy.ImageResult.overlay`),
                kept as JPEG; called only when it is kept (None: none kept).

        Returns:
            The decision as recorded (its ``id`` names it in corrections).

        Raises:
            DataError: ``image`` is a file that is gone.
            OSError: the record or a kept file could not be written (a full or failing disk).
        """
        decision_id = uuid.uuid4().hex
        verdict = verdict_of(result.is_anomalous)
        keeping = self.keeps(verdict)
        path = image if isinstance(image, Path) else None
        try:
            if keeping and path is not None:
                image = path.read_bytes()  # read once: kept and digested
            digest, digest_of = image_digest(image)
        except FileNotFoundError as err:
            raise DataError(f"image {path} was removed before its decision was recorded") from err
        kept_image = kept_overlay = None
        written: list[Path] = []
        if keeping:
            if isinstance(image, (bytes, bytearray, memoryview)):
                data = bytes(image)
                suffix = path.suffix.lower() if path is not None and is_image_file(path) else _suffix(data)
            else:
                data, suffix = to_png_bytes(np.asarray(image, np.uint8)), ".png"
            kept_image = f"{IMAGES_DIR}/{decision_id}{suffix}"
            written.append(self._write(kept_image, data))
            if overlay is not None:
                kept_overlay = f"{OVERLAYS_DIR}/{decision_id}.jpg"
                written.append(self._write(kept_overlay, to_jpeg_bytes(overlay())))
        height, width = result.size
        score = float(result.score)
        decision = Decision(
            id=decision_id,
            time=utc_now(),
            source=self.source,
            model=self.model,
            category=category,
            name=name,
            image_sha256=digest,
            image_digest_of=digest_of,
            score=score if np.isfinite(score) else None,
            verdict=verdict,
            threshold=result.threshold,
            threshold_source=thresholds.source,
            threshold_rule=thresholds.rule,
            threshold_images=thresholds.images,
            pixel_threshold=result.pixel_threshold,
            thresholds_digest=thresholds.digest,
            width=int(width),
            height=int(height),
            image=kept_image,
            overlay=kept_overlay,
        )
        with self._mutex:
            append_jsonl(self.folder / LOG_FILE, decision.to_json())
            size = (self.folder / LOG_FILE).stat().st_size
            self._stored += size - self._current_size
            self._current_size = size
            if written:
                kept_size = sum(path.stat().st_size for path in written)
                self._kept.append(_Kept(decision_id, written, kept_size, time.time_ns()))
                self._stored += kept_size
            self._recent[decision_id] = decision
            while len(self._recent) > RECENT:
                self._recent.popitem(last=False)
            if self._current_size >= self.segment_bytes:
                self._rotate()
            self._enforce_cap()
            self._notify(self._subscribers, decision)
        return decision

    def _write(self, relative: str, data: bytes) -> Path:
        path = self.folder / relative
        atomic_write_bytes(path, data)
        return path

    def _rotate(self) -> None:
        """Rename the current segment to the next number (the next record starts a new one)."""
        number = self._segments[-1].number + 1 if self._segments else 1
        target = self.folder / f"decisions.{number}.jsonl"
        os.replace(self.folder / LOG_FILE, target)
        fsync_path(self.folder)
        self._segments.append(_Segment(number, target, self._current_size, time.time_ns()))
        self._current_size = 0

    def _enforce_cap(self) -> None:
        """Remove the oldest kept files, or a whole segment once it is older than every kept file, until the log
        fits :attr:`max_bytes` (the current segment is never removed).
        """
        while self._stored > self.max_bytes:
            oldest = self._segments[0] if self._segments else None
            if self._kept and (oldest is None or self._kept[0].mtime_ns <= oldest.mtime_ns):
                kept = self._kept.popleft()
                for path in kept.paths:
                    path.unlink(missing_ok=True)
                self._stored -= kept.size
                log.debug("decision log: removed the kept files of %s (size cap)", kept.decision)
            elif oldest is not None:
                self._segments.pop(0)
                oldest.path.unlink(missing_ok=True)
                self._stored -= oldest.size
                log.info("decision log: removed %s (size cap of %.0f MiB)", oldest.path.name, self.max_bytes / 2**20)
            else:
                break

    # ----------------------------------------------------------------------------------------------- reading
    @property
    def stored_bytes(self) -> int:
        """The bytes the segments and kept files take now."""
        return self._stored

    def find(self, decision_id: str) -> Decision | None:
        """The decision with this id: from memory for the newest :data:`RECENT`, else from the segments on disk."""
        if not _ID.fullmatch(decision_id):
            return None
        with self._mutex:
            found = self._recent.get(decision_id)
        if found is not None:
            return found
        # The current segment first, then the numbered ones listed afresh: a rotation in between cannot hide a record.
        current = self.folder / LOG_FILE
        for path in [current, *reversed([p for p in segments(self.folder) if p != current])]:
            try:
                records = read_jsonl(path)
            except FileNotFoundError:  # removed by the size cap meanwhile
                continue
            for record in records:
                if isinstance(record, dict) and record.get("id") == decision_id:
                    return Decision.from_json(record)
        return None

    def recent(
        self, limit: int = 20, *, category: str | None = None, verdict: str | None = None
    ) -> list[tuple[Decision, Feedback | None]]:
        """The newest decisions (of ``category``, with ``verdict``), newest first, with their latest correction."""
        with self._mutex:
            newest = list(reversed(self._recent.values()))
            feedback = dict(self._feedback)
        chosen = select_decisions(newest, category=category, verdict=verdict)
        return [
            (decision, feedback.get(decision.id)) for decision, _ in zip(chosen, range(max(0, limit)), strict=False)
        ]

    def kept_file(self, decision_id: str, kind: KeptKind) -> Path | None:
        """The kept image or overlay of a decision, or None (unknown, not kept, or removed by the size cap)."""
        decision = self.find(decision_id)
        return kept_path(self.folder, decision, kind) if decision is not None else None

    # ---------------------------------------------------------------------------------------------- feedback
    def add_feedback(self, decision_id: str, label: str, note: str | None = None) -> Feedback:
        """Record an operator's correction of a decision, durably (the latest one of a decision counts).

        Raises:
            DataError: ``label`` is not ``"good"`` or ``"defect"``.
            UnknownDecision: the log holds no decision with this id.
        """
        if label not in LABELS:
            raise DataError(f"label {label!r}: use one of {', '.join(LABELS)}")
        decision = self.find(decision_id)
        if decision is None:
            raise UnknownDecision(f"the decision log {self.folder} holds no decision {decision_id[:40]!r}")
        feedback = Feedback(decision.id, label, utc_now(), note, decision.verdict, decision.category)
        with self._mutex:
            append_jsonl(self.folder / FEEDBACK_FILE, feedback.to_json())
            self._feedback[decision.id] = feedback
            self._notify(self._feedback_subscribers, feedback)
        return feedback

    def feedback(self, decision_id: str) -> Feedback | None:
        """The latest correction of a decision, or None."""
        with self._mutex:
            return self._feedback.get(decision_id)
