"""Crash-safe file writing: whole files appear atomically (temporary file, fsync, rename); logs append and flush.

A reader never sees a half-written result file, and a run killed at any moment leaves the previous version intact. A
log line cut short by a power loss is skipped when read and cut off when the log is opened to append again
(:func:`repair_jsonl`). A failed write or fsync raises an ``OSError`` that names the file. A folder that one process
at a time writes into holds a lock file (:func:`hold_lock`); files are identified by their SHA-256
(:func:`sha256_file`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: nothing is locked
    fcntl = None  # type: ignore[assignment]  # the module or None

log = logging.getLogger(__name__)

# What fsync of a folder answers where folders cannot be flushed (some file systems and platforms): nothing to do.
_FOLDER_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})
_TAIL_CHUNK = 1 << 16


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries (making renames inside it durable), to disk.

    Raises:
        OSError: a file cannot be opened or flushed (a full disk, an I/O error): what was written may not be on disk.
            For a folder, only errors other than "folders cannot be opened or flushed here" (Windows, some file
            systems) are raised.
    """
    path = Path(path)
    if path.is_dir():
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:  # Windows opens no folder: nothing to flush
            return
        try:
            os.fsync(fd)
        except OSError as err:
            if err.errno not in _FOLDER_FSYNC_UNSUPPORTED:
                raise _with_filename(err, path) from err
        finally:
            os.close(fd)
        return
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows flushes writable handles only
    try:
        os.fsync(fd)
    except OSError as err:
        raise _with_filename(err, path) from err
    finally:
        os.close(fd)


def _with_filename(err: OSError, path: str | os.PathLike[str]) -> OSError:
    """``err`` naming ``path`` (``os.write`` and ``os.fsync`` errors name no file), as the same ``OSError`` subclass."""
    if err.filename is not None:
        return err
    return type(err)(err.errno, err.strerror, os.fspath(path))


def default_mode(folder: bool = False) -> int:
    """The permissions a plain ``open()`` / ``mkdir()`` would give under the current umask (mkstemp and mkdtemp
    give 0600 / 0700).
    """
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if folder else 0o666) & ~mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, default_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _with_filename(err, path) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    r"""Write ``text`` as UTF-8; undecodable file-name bytes in it (lone surrogates) are written as ``\udcXX``."""
    atomic_write_bytes(path, text.encode("utf-8", errors="backslashreplace"))


def atomic_write_json(path: str | os.PathLike[str], value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2, allow_nan=True) + "\n")


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON line and flush it to disk, so lines already written survive a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:  # a non-UTF-8 file name (lone surrogates): JSON \\u escapes round-trip it exactly
        line = (json.dumps(record) + "\n").encode("ascii")
    # One write() on an O_APPEND descriptor: lines of processes appending to the same file never interleave.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line)
        os.fsync(fd)
    except OSError as err:
        raise _with_filename(err, path) from err
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON-lines file, skipping lines that are not whole JSON (a last line cut short by a crash, also one cut
    inside a multi-byte character).
    """
    records: list[dict[str, Any]] = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_bytes().splitlines():
        try:
            records.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
    return records


def repair_jsonl(path: str | os.PathLike[str]) -> int:
    """Make a JSON-lines file end with a whole line before appending to it again.

    A power loss in the middle of :func:`append_jsonl` can leave a last line without its newline; the next line
    appended would then share its line, and both would be lost to :func:`read_jsonl`. A tail that is a whole JSON
    object (only the newline is missing) gets its newline; any other tail is cut off (no complete line is lost).

    Returns:
        How many bytes were cut off (0 when the file ends with a newline, is empty or does not exist).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    if size == 0:
        return 0
    with open(path, "r+b") as handle:
        end = size
        tail = b""
        while end > 0:  # read backwards to the last newline
            start = max(0, end - _TAIL_CHUNK)
            handle.seek(start)
            chunk = handle.read(end - start)
            if chunk.endswith(b"\n") and not tail:
                return 0
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                tail = chunk[newline + 1 :] + tail
                break
            tail = chunk + tail
            end = start
        try:
            whole = isinstance(json.loads(tail.decode("utf-8")), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            whole = False
        if whole:
            handle.seek(size)
            handle.write(b"\n")
            cut = 0
        else:
            handle.truncate(size - len(tail))
            cut = len(tail)
        handle.flush()
        os.fsync(handle.fileno())
    log.warning(
        "%s ended in a line cut short (a crash while appending): %s",
        path,
        f"removed its {cut} bytes" if cut else "added the missing newline",
    )
    return cut


def sha256_file(*paths: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (of several files: of their bytes one after the other)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def hold_lock(path: str | os.PathLike[str]) -> tuple[int | None, str | None]:
    """Take the exclusive lock of the file ``path`` (created when missing) without waiting, and write this process's id
    and host into it.

    ``flock`` locks per open file, so a second open in the same process is refused too; the lock goes with its process
    (also when it is killed).

    Returns:
        ``(fd, None)`` when held (close ``fd`` to release it); ``(None, holder)`` when another process holds it
        (``holder``: ``"process PID"``, plus ``" on HOST"`` when that is another machine); ``(None, None)`` where files
        cannot be locked (no ``fcntl``: Windows; a file system without locks, which a warning names).
    """
    if fcntl is None:
        return None, None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        found = os.pread(fd, 256, 0).decode("utf-8", "replace").split() or ["unknown"]
        os.close(fd)
        where = f" on {found[1]}" if len(found) > 1 and found[1] != socket.gethostname() else ""
        return None, f"process {found[0]}{where}"
    except OSError as err:
        os.close(fd)
        log.warning("cannot lock %s (%s): a second writer into its folder would not be noticed", path, err)
        return None, None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd, None
