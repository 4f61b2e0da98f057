"""A watched folder (what ``cnc predict --watch DIR`` runs): score each image once it has been written completely.

Each new image file in the folder (and its subfolders) is scored as soon as its size and modification time have not
changed for ``settle`` seconds, through the same crash-safe writer as batch prediction
(:func:`cnc_ad.deploy.predict.predict_stream`): its map, mask and overlay are written, then its ``predictions.jsonl``
line is appended and fsynced. Only then is the file moved (``after="move:DIR"``) or left where it is.

Exactly once across restarts: ``predictions.jsonl`` is the one record of what is done. A file is identified by its
path, size and modification time (each record holds them), so an image written under the name of one already scored
is scored again. On start the watcher reads the records, then takes every image already in the folder that it does not
record; a recorded file still in the folder in move mode is one whose move a kill interrupted, and it is moved without
being scored again. A file that cannot be decoded (e.g. written more slowly than the settle time) gets an
``errors.jsonl`` line and is tried again once it changes. Symbolic links in the folder are not followed.

Changes are noticed through ``watchfiles`` (inotify, FSEvents, ReadDirectoryChangesW) or, with ``poll`` seconds, or
when ``watchfiles`` is not installed, by listing the folder every ``poll`` seconds (network shares, where change
notifications do not arrive).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from cnc_ad.data.images import is_image_file
from cnc_ad.deploy.decisions import DecisionLog
from cnc_ad.deploy.detector import Detector
from cnc_ad.deploy.predict import (
    MAP_DTYPES,
    PREDICTIONS_FILE,
    SUMMARY_FILE,
    FileVersion,
    RecordedFiles,
    open_output,
    predict_stream,
    write_summary_csv,
)
from cnc_ad.errors import ConfigError
from cnc_ad.files import fsync_path

log = logging.getLogger(__name__)

DEFAULT_SETTLE_S = 1.0
"""Seconds a file's size and modification time must stay unchanged before it counts as written completely."""
WAKE_S = 0.1
"""How often (seconds) the watchfiles loop wakes up without changes, to check files that are settling."""
RESCAN_S = 60.0
"""How often (seconds) the watchfiles loop also lists the whole folder: a safety net for lost notifications (an
overflowing inotify queue)."""


@dataclass(frozen=True)
class After:
    """What happens to a file once its record is on disk: left where it is, or moved into ``move_to``."""

    move_to: Path | None = None

    @classmethod
    def parse(cls, text: str) -> After:
        """``leave`` or ``move:DIR``.

        Raises:
            ConfigError: anything else.
        """
        if text == "leave":
            return cls()
        if text.startswith("move:") and text[5:].strip():
            return cls(Path(text[5:]).expanduser().resolve())
        raise ConfigError(f"after={text!r}: use leave, or move:DIR (a folder to move scored files into)")


@dataclass
class WatchSummary:
    """What :func:`watch_folder` did until it stopped."""

    out: Path
    folder: Path
    mode: str  # "watchfiles" or "poll"
    predicted: int = 0
    failed: int = 0
    anomalous: int = 0
    moved: int = 0
    recorded_before: int = 0
    stopped_by: str = ""


@dataclass
class _Pending:
    fingerprint: FileVersion
    since: float  # monotonic time the fingerprint was first seen


@dataclass
class _State:
    done: RecordedFiles = field(default_factory=RecordedFiles)
    pending: dict[Path, _Pending] = field(default_factory=dict)
    failed: dict[Path, FileVersion] = field(default_factory=dict)  # undecodable, until the file changes
    links: set[Path] = field(default_factory=set)  # symbolic links found (and warned about) in the folder


def _fingerprint(path: Path) -> FileVersion | None:
    """The version of a regular file (a symbolic link is not followed: None), or None when there is none."""
    try:
        status = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(status.st_mode):
        return None
    return status.st_size, status.st_mtime_ns


def _link_in(folder: Path, path: Path) -> Path | None:
    """The first symbolic link on the way from ``folder`` down to ``path`` (``path`` included), or None."""
    current = folder
    for part in path.relative_to(folder).parts:
        current = current / part
        if current.is_symlink():
            return current
    return None


def _is_within(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path == folder or folder in path.parents)


def _scan(folder: Path, excluded: Iterable[Path]) -> Iterator[Path]:
    """Every image file under ``folder`` (absolute), outside the ``excluded`` folders, and every symbolic link (yielded,
    never followed); each real folder once.
    """
    skip = set(excluded)
    seen: set[tuple[int, int]] = set()
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            status = os.lstat(current)
            if not stat.S_ISDIR(status.st_mode) or (status.st_dev, status.st_ino) in seen:
                continue
            seen.add((status.st_dev, status.st_ino))
            entries = list(os.scandir(current))
        except OSError:  # vanished, or not readable
            continue
        for entry in sorted(entries, key=lambda e: e.name):
            path = Path(entry.path)
            try:
                if entry.name.startswith("."):
                    continue
                if entry.is_symlink():
                    yield path
                elif entry.is_dir(follow_symlinks=False):
                    if path not in skip:
                        stack.append(path)
                elif entry.is_file(follow_symlinks=False) and is_image_file(path):
                    yield path
            except OSError:
                continue


def _move(path: Path, folder: Path, move_to: Path) -> Path:
    """Move ``path`` (inside ``folder``) to the same relative place under ``move_to``; return where it went.

    A rename when both are on one file system. Across file systems: copied to a temporary name, fsynced, renamed into
    place, then the source removed; a kill in between leaves both, and the next start removes the source then (the
    copy is complete). A failed copy or fsync (a full or failing disk) raises and leaves the source where it is. A
    different file already at the destination is never overwritten: the name gets ``-1``, ``-2``...
    """
    target = move_to / path.relative_to(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    stem, suffix, n = target.stem, target.suffix, 0
    while target.exists():
        if _same_content(path, target):  # copied before a kill, source not yet removed
            path.unlink()
            return target
        n += 1
        target = target.with_name(f"{stem}-{n}{suffix}")
    try:
        os.rename(path, target)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        partial = target.with_name(f".{target.name}.partial")
        try:
            shutil.copyfile(path, partial)
            fsync_path(partial)  # raises when the copy may not be on disk: then the source stays
            os.replace(partial, target)
            fsync_path(target.parent)
        finally:
            partial.unlink(missing_ok=True)
        path.unlink()
        return target
    fsync_path(target.parent)
    return target


def _same_content(a: Path, b: Path) -> bool:
    try:
        if a.stat().st_size != b.stat().st_size:
            return False
        with a.open("rb") as fa, b.open("rb") as fb:
            while True:
                chunk_a, chunk_b = fa.read(1 << 20), fb.read(1 << 20)
                if chunk_a != chunk_b:
                    return False
                if not chunk_a:
                    return True
    except OSError:
        return False


class _StopSignals:
    """SIGINT and SIGTERM set ``stop`` (the current batch finishes, then the watcher stops; a second Ctrl-C
    interrupts at once); the previous handlers are restored on exit.
    """

    def __init__(self, stop: threading.Event, summary: WatchSummary) -> None:
        self.stop, self.summary = stop, summary
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.stop.is_set() and signum == signal.SIGINT:  # a second Ctrl-C: do not wait for the batch
            raise KeyboardInterrupt
        self.summary.stopped_by = signal.Signals(signum).name
        self.stop.set()

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def watchfiles_available() -> bool:
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        return False
    return True


def watch_folder(
    detector: Detector,
    folder: str | os.PathLike,
    out: str | os.PathLike,
    *,
    after: After | None = None,
    poll: float | None = None,
    settle: float = DEFAULT_SETTLE_S,
    batch_size: int = 16,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    category: str | None = None,
    map_dtype: str = "float16",
    overlay_max_side: int = 2048,
    stop: threading.Event | None = None,
    on_ready: Callable[[], None] | None = None,
    decisions: DecisionLog | None = None,
) -> WatchSummary:
    """Watch ``folder`` and score each image written into it into ``out``, once, until ``stop`` is set.

    Args:
        detector: the model.
        folder: the folder to watch (with its subfolders; hidden files and folders, and ``out`` and the move folder
            when inside it, are ignored).
        out: output folder, as for :func:`cnc_ad.deploy.predict.predict_files`; predictions already there are kept and
            their files never scored again.
        after: leave files (default), or move each scored file into a folder, at the same relative path, once its
            line is on disk (an undecodable file stays, and is tried again when it changes).
        poll: list the folder every ``poll`` seconds instead of waiting for change notifications (network shares);
            also used when ``watchfiles`` is not installed (with 1 s).
        settle: seconds a file's size and mtime must stay unchanged before it is read.
        batch_size: the most images per model call.
        threshold: image threshold, as for :func:`cnc_ad.deploy.predict.predict_files`.
        pixel_threshold: mask threshold, as there.
        category: use this category's stored thresholds.
        map_dtype: ``"float16"`` or ``"float32"`` for the ``.npy`` maps.
        overlay_max_side: the longest side of an overlay PNG in pixels.
        stop: set it to stop (SIGINT and SIGTERM set it when called from the main thread).
        on_ready: called once the files present at the start are queued and the watch has begun.
        decisions: a decision log to record every decision in, as :func:`cnc_ad.deploy.predict.predict_files` does.

    Raises:
        ConfigError: a bad option, ``folder`` is not a folder, or another predictor or watcher writes into ``out``.
    """
    if map_dtype not in MAP_DTYPES:
        raise ConfigError(f"map dtype {map_dtype!r}; use one of {', '.join(MAP_DTYPES)}")
    if settle < 0 or (poll is not None and not poll > 0):
        raise ConfigError("settle must be >= 0 and poll > 0 seconds")
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"watched folder {folder} is not a folder; create it, or name the folder images arrive in")
    out = Path(out).expanduser().resolve()
    after = after or After()
    if after.move_to is not None and (after.move_to == folder or _is_within(folder, after.move_to)):
        raise ConfigError(f"after=move:{after.move_to}: the move folder must not be the watched folder or above it")
    if poll is None and not watchfiles_available():
        log.warning("watchfiles is not installed: polling the folder every 1 s (pip install watchfiles)")
        poll = 1.0
    stop = stop or threading.Event()
    summary = WatchSummary(out, folder, "poll" if poll is not None else "watchfiles")
    state = _State()  # what is done: read when the output folder is opened, below
    excluded = [p for p in (out, after.move_to) if p is not None and _is_within(p, folder)]
    choice = detector.choose_thresholds(threshold, pixel_threshold, category)
    if choice.image is None:
        log.warning("no threshold (evaluate the model, or give one): is_anomalous is null, no masks are written")

    def note(paths: Iterable[Path]) -> None:
        for path in paths:
            if any(_is_within(path, p) for p in excluded):
                continue
            try:
                if any(part.startswith(".") for part in path.relative_to(folder).parts):
                    continue
            except ValueError:  # not under the folder
                continue
            if not is_image_file(path) and not path.is_symlink():
                continue
            if _is_linked(path):
                continue
            if after.move_to is None and state.done.has(str(path), _fingerprint(path)):  # left in place once scored
                continue
            if path not in state.pending:
                fingerprint = _fingerprint(path)
                if fingerprint is not None:
                    state.pending[path] = _Pending(fingerprint, time.monotonic())

    def _is_linked(path: Path) -> bool:
        """Whether ``path`` is, or lies behind, a symbolic link (warned about once per link): what a link points at
        may lie outside the folder, so it is neither scored nor moved.
        """
        try:
            link = _link_in(folder, path)
        except (OSError, ValueError):
            return True
        if link is None:
            return False
        if link not in state.links:
            state.links.add(link)
            log.warning("%s is a symbolic link: not followed (only files in %s are scored and moved)", link, folder)
        return True

    def process() -> None:
        """Score the files that have settled (a batch at a time); move them when asked."""
        now = time.monotonic()
        ready: list[Path] = []
        for path, pending in list(state.pending.items()):
            fingerprint = _fingerprint(path)
            if fingerprint is None:  # gone (moved away or deleted before it settled)
                del state.pending[path]
            elif fingerprint != pending.fingerprint:
                state.pending[path] = _Pending(fingerprint, now)
            elif now - pending.since >= settle:
                del state.pending[path]
                if _is_linked(path):  # a folder on its way replaced by a link since it was noticed
                    continue
                if state.done.has(str(path), fingerprint):
                    if after.move_to is not None:  # recorded before a kill, not moved yet
                        _after(path)
                elif state.failed.get(path) != fingerprint:
                    ready.append(path)
        for start in range(0, len(ready), max(1, batch_size)):
            if stop.is_set():
                for path in ready[start:]:  # noticed again at the next start
                    state.pending.pop(path, None)
                return
            batch = ready[start : start + max(1, batch_size)]
            fingerprints = {path: _fingerprint(path) for path in batch}
            for outcome in predict_stream(
                detector,
                batch,
                out,
                image_threshold=choice.image,
                pixel_threshold=choice.pixel,
                batch_size=len(batch),
                map_dtype=map_dtype,
                overlay_max_side=overlay_max_side,
                decisions=decisions,
                choice=choice,
                category=category,
            ):
                if outcome.record is None:
                    summary.failed += 1
                    fingerprint = fingerprints.get(outcome.path)
                    if fingerprint is not None:
                        state.failed[outcome.path] = fingerprint
                    continue
                state.done.add(outcome.record)
                state.failed.pop(outcome.path, None)
                summary.predicted += 1
                anomalous = outcome.record["is_anomalous"]
                summary.anomalous += bool(anomalous)
                verdict = "" if anomalous is None else (" ANOMALOUS" if anomalous else " ok")
                log.info("%s: score %.6g%s", outcome.path, outcome.record["score"], verdict)
                _after(outcome.path)

    def _after(path: Path) -> None:
        if after.move_to is None:
            return
        try:
            target = _move(path, folder, after.move_to)
        except OSError as err:
            log.warning("could not move %s to %s: %s (it stays; it is not scored again)", path, after.move_to, err)
            return
        summary.moved += 1
        log.debug("moved %s to %s", path, target)

    def started() -> None:
        """Queue the files already there (once the watch has begun, so that none falls between the two)."""
        note(_scan(folder, excluded))
        log.info(
            "watching %s (%s); %d image(s) recorded before, %d to check; results: %s",
            folder,
            f"listing every {poll:g} s" if poll is not None else "change notifications",
            summary.recorded_before,
            len(state.pending),
            out,
        )
        if on_ready is not None:
            on_ready()

    with open_output(out, resume=True, overwrite=False) as done, _StopSignals(stop, summary):  # locked while watching
        state.done = done
        summary.recorded_before = len(done)
        try:
            if poll is not None:
                started()
                _poll_loop(folder, excluded, poll, settle, stop, note, process)
            else:
                _watchfiles_loop(folder, excluded, stop, started, note, process)
        finally:
            if (out / PREDICTIONS_FILE).exists():
                write_summary_csv(out / PREDICTIONS_FILE, out / SUMMARY_FILE)
    summary.stopped_by = summary.stopped_by or "stop"
    log.info(
        "stopped (%s): %d predicted (%d anomalous), %d failed, %d moved; results: %s",
        summary.stopped_by,
        summary.predicted,
        summary.anomalous,
        summary.failed,
        summary.moved,
        out,
    )
    return summary


def _poll_loop(
    folder: Path,
    excluded: list[Path],
    poll: float,
    settle: float,
    stop: threading.Event,
    note: Callable[[Iterable[Path]], None],
    process: Callable[[], None],
) -> None:
    """List the folder every ``poll`` seconds; check settling files more often when ``settle`` is shorter."""
    step = min(poll, max(settle / 2, 0.05))
    next_scan = 0.0
    while not stop.is_set():
        if time.monotonic() >= next_scan:
            note(_scan(folder, excluded))
            next_scan = time.monotonic() + poll
        process()
        stop.wait(step)


def _watchfiles_loop(
    folder: Path,
    excluded: list[Path],
    stop: threading.Event,
    started: Callable[[], None],
    note: Callable[[Iterable[Path]], None],
    process: Callable[[], None],
) -> None:
    """Wait for change notifications (waking every :data:`WAKE_S` to check files that are settling).

    A new subfolder is listed when it appears (files written into it before its own watch began send no event), and
    the whole folder every :data:`RESCAN_S` seconds.
    """
    import watchfiles

    next_scan = time.monotonic() + RESCAN_S
    first = True
    for changes in watchfiles.watch(
        folder,
        stop_event=stop,
        debounce=50,
        step=20,
        rust_timeout=int(WAKE_S * 1000),
        yield_on_timeout=True,
        raise_interrupt=False,
        recursive=True,
    ):
        if first:  # the first answer comes once the watch is set up: now list what is already there
            started()
            first = False
        for change, name in changes:
            path = Path(name)
            if change == watchfiles.Change.deleted:
                continue
            if path.is_dir() and not path.is_symlink():
                if not any(_is_within(path, p) for p in excluded):
                    note(_scan(path, excluded))
            else:
                note([path])
        if time.monotonic() >= next_scan:
            note(_scan(folder, excluded))
            next_scan = time.monotonic() + RESCAN_S
        process()
        if stop.is_set():
            break
