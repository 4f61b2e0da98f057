"""Crash-safe files: JSON lines cut short by a power loss, and write and fsync failures that name their file."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from cnc_ad.files import append_jsonl, atomic_write_bytes, fsync_path, read_jsonl, repair_jsonl

RECORDS = [{"path": "/in/a.png", "score": 0.5}, {"path": "/in/é.png", "score": 1.5}]


def _lines(records: list[dict]) -> bytes:
    return b"".join((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in records)


def test_read_jsonl_skips_a_last_line_cut_inside_a_multibyte_character(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    torn = '{"path": "/in/é.png"'.encode()
    path.write_bytes(_lines(RECORDS) + torn[: torn.index(b"\xc3") + 1])  # half of the two bytes of "é"
    assert read_jsonl(path) == RECORDS


@pytest.mark.parametrize("tail_bytes", [1, 17, 70_000])  # a last line longer than one chunk read from the end
def test_repair_jsonl_cuts_a_torn_tail_so_the_next_line_is_whole(tmp_path: Path, tail_bytes: int) -> None:
    path = tmp_path / "predictions.jsonl"
    whole = _lines(RECORDS)
    torn = _lines([{"path": "/in/c.png", "note": "x" * tail_bytes}])[:tail_bytes]
    path.write_bytes(whole + torn)
    assert repair_jsonl(path) == len(torn)
    assert path.read_bytes() == whole
    append_jsonl(path, {"path": "/in/c.png", "score": 2.0})
    assert read_jsonl(path) == [*RECORDS, {"path": "/in/c.png", "score": 2.0}]


def test_repair_jsonl_keeps_a_whole_last_record_and_leaves_sound_files_alone(tmp_path: Path) -> None:
    path = tmp_path / "predictions.jsonl"
    path.write_bytes(_lines(RECORDS)[:-1])  # only the newline is missing: the record is whole
    assert repair_jsonl(path) == 0
    assert path.read_bytes() == _lines(RECORDS)
    assert repair_jsonl(path) == 0 and path.read_bytes() == _lines(RECORDS)
    torn_only = tmp_path / "torn.jsonl"
    torn_only.write_bytes(b'{"pa')
    assert repair_jsonl(torn_only) == 4 and torn_only.read_bytes() == b""
    assert repair_jsonl(tmp_path / "missing.jsonl") == 0


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(OSError) as err:
        append_jsonl(Path("/dev/full"), {"path": "a"})  # every write answers "No space left on device"
    assert err.value.errno == errno.ENOSPC and err.value.filename == "/dev/full"


def test_fsync_failures_of_files_are_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "a.bin"
    atomic_write_bytes(file, b"data")

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError) as err:
        fsync_path(file)
    assert err.value.errno == errno.EIO and err.value.filename == str(file)
    with pytest.raises(OSError) as err:  # a folder's I/O error too
        fsync_path(tmp_path)
    assert err.value.errno == errno.EIO
    with pytest.raises(OSError, match="Input/output error") as err:
        atomic_write_bytes(tmp_path / "b.bin", b"data")
    assert err.value.filename == str(tmp_path / "b.bin") and not list(tmp_path.glob(".b.bin.*"))


def test_folders_that_cannot_be_flushed_are_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(fd: int) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", unsupported)
    fsync_path(tmp_path)  # some file systems cannot flush a folder: nothing to do
    (tmp_path / "a.bin").write_bytes(b"data")
    with pytest.raises(OSError):
        fsync_path(tmp_path / "a.bin")  # a file that cannot be flushed is an error
