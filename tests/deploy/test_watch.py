"""`cnc predict --watch DIR`: files appearing while the watcher runs (one written slowly), a kill -9 and a restart in
the middle, the polling fallback, move mode (with a kill between the record and the move), and the options.

Nothing sleeps for a fixed time to let the watcher work: each test waits for what it expects, with a timeout."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cnc_ad import Detector
from cnc_ad.cli import main
from cnc_ad.deploy import watch as watch_module
from cnc_ad.deploy.decisions import DecisionLog, read_decisions
from cnc_ad.deploy.predict import open_output
from cnc_ad.deploy.watch import After, WatchSummary, watch_folder
from cnc_ad.errors import ConfigError
from cnc_ad.files import read_jsonl
from tests.helpers import save_tiny_checkpoint

THRESHOLDS = {"image": {"__all__": 0.0}, "pixel": {"__all__": 0.9}}
TIMEOUT_S = 120.0
SETTLE_S = 0.3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("run") / "ckpt", THRESHOLDS)


@pytest.fixture(scope="module")
def detector(checkpoint: Path) -> Detector:
    return Detector.load(checkpoint, device="cpu")


def _png(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _drop(path: Path, seed: int) -> Path:
    """Write an image the way most cameras and copy tools do not: in place, in one go."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(seed))
    return path


def _records(out: Path) -> list[dict[str, Any]]:
    return read_jsonl(out / "predictions.jsonl")


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


class Watcher:
    """``watch_folder`` in a thread of this process; ``stop()`` stops it and returns its summary."""

    def __init__(self, detector: Detector, folder: Path, out: Path, **options: Any) -> None:
        self.stop_event, self.ready = threading.Event(), threading.Event()
        self.summary: WatchSummary | None = None
        self.error: BaseException | None = None

        def target() -> None:
            try:
                self.summary = watch_folder(
                    detector, folder, out, settle=SETTLE_S, stop=self.stop_event, on_ready=self.ready.set, **options
                )
            except BaseException as err:
                self.error = err
                self.ready.set()

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()
        assert self.ready.wait(TIMEOUT_S), "the watcher did not start"
        if self.error is not None:
            raise self.error

    def stop(self) -> WatchSummary:
        self.stop_event.set()
        self.thread.join(TIMEOUT_S)
        assert not self.thread.is_alive(), "the watcher did not stop"
        if self.error is not None:
            raise self.error
        assert self.summary is not None
        return self.summary


def test_files_appearing_while_watching_are_scored_once_and_complete(detector: Detector, tmp_path: Path) -> None:
    incoming, out = tmp_path / "incoming", tmp_path / "out"
    before = _drop(incoming / "before.png", 0)  # there before the start: scored too
    watcher = Watcher(detector, incoming, out)
    try:
        quick = _drop(incoming / "a.png", 1)
        nested = _drop(incoming / "line2" / "b.png", 2)
        (incoming / ".c.png.tmp").write_bytes(b"partial")  # hidden and not an image name: ignored
        # One file written slowly: 8 chunks, each well within the settle time of the one before.
        slow = incoming / "slow.png"
        data = _png(3, (64, 64))
        with slow.open("wb") as handle:
            for start in range(0, len(data), -(-len(data) // 8)):
                handle.write(data[start : start + -(-len(data) // 8)])
                handle.flush()
                time.sleep(SETTLE_S / 6)
        _wait_for(lambda: len(_records(out)) >= 4, "4 records")
        # The same file written again in place, with its size and mtime, is not scored again (that version is recorded).
        mtime_ns = quick.stat().st_mtime_ns
        _drop(incoming / "a.png", 1)
        os.utime(quick, ns=(mtime_ns, mtime_ns))
        late = _drop(incoming / "late.png", 4)
        _wait_for(lambda: len(_records(out)) >= 5, "the late file's record")
    finally:
        summary = watcher.stop()
    records = _records(out)
    paths = Counter(record["path"] for record in records)
    assert paths == Counter({str(p.resolve()): 1 for p in (before, quick, nested, slow, late)})
    assert summary.predicted == 5 and summary.mode == "watchfiles"
    # The slow file was read complete: its score is the one of the whole file.
    by_path = {record["path"]: record for record in records}
    expected = detector.predict(slow).scores[0]
    assert by_path[str(slow.resolve())]["score"] == pytest.approx(float(expected), abs=1e-5)
    for record in records:
        assert (out / record["map"]).is_file() and (out / record["overlay"]).is_file()
    assert (out / "predictions.csv").read_text().count("\n") == 6  # header + 5 rows


def test_each_watched_decision_goes_into_the_decision_log(detector: Detector, tmp_path: Path) -> None:
    incoming, out = tmp_path / "incoming", tmp_path / "out"
    incoming.mkdir()
    with DecisionLog(tmp_path / "decisions", source="watch", model=detector.model_id, keep="all") as log:
        watcher = Watcher(detector, incoming, out, decisions=log, after=After(tmp_path / "done"))
        try:
            first = _drop(incoming / "a.png", 1)
            data = first.read_bytes()
            _drop(incoming / "b.png", 2)
            _wait_for(lambda: len(_records(out)) >= 2, "2 records")
        finally:
            watcher.stop()
    decisions = {Path(d.name).name: d for d in read_decisions(tmp_path / "decisions")}
    records = {Path(r["path"]).name: r for r in _records(out)}
    assert set(decisions) == {"a.png", "b.png"} and all(d.source == "watch" for d in decisions.values())
    for name, decision in decisions.items():
        assert records[name]["decision"] == decision.id and decision.score == pytest.approx(records[name]["score"])
        assert decision.threshold == 0.0 and decision.verdict == "anomalous" and decision.model == detector.model_id
    assert (tmp_path / "decisions" / decisions["a.png"].image).read_bytes() == data  # kept before the file moved


@pytest.mark.parametrize("after", ["leave", "move"])
def test_a_new_image_under_a_name_already_scored_is_scored_again(
    detector: Detector, tmp_path: Path, after: str
) -> None:
    incoming, out, done = tmp_path / "incoming", tmp_path / "out", tmp_path / "done"
    incoming.mkdir()
    watcher = Watcher(detector, incoming, out, after=After.parse(f"move:{done}" if after == "move" else "leave"))
    try:
        image = _drop(incoming / "img_0001.png", 13)
        _wait_for(lambda: len(_records(out)) >= 1, "the first record")
        first_version = (image.stat().st_size, image.stat().st_mtime_ns) if after == "leave" else None
        _wait_for(lambda: after == "leave" or not image.exists(), "the move")
        _drop(image, 14)  # the camera starts its numbering again: another image, the same name
        _wait_for(lambda: len(_records(out)) >= 2, "the record of the second image of that name")
    finally:
        summary = watcher.stop()
    records = _records(out)
    assert [r["path"] for r in records] == [str(image.resolve())] * 2 and summary.predicted == 2
    assert records[0]["score"] != records[1]["score"]  # two images, two scores
    assert records[1]["size"] == len(_png(14)) and records[0]["size"] == len(_png(13))
    if after == "leave":
        assert (records[0]["size"], records[0]["mtime_ns"]) == first_version
        assert (records[1]["size"], records[1]["mtime_ns"]) == (image.stat().st_size, image.stat().st_mtime_ns)
    else:
        assert (done / "img_0001.png").read_bytes() == _png(13) and (done / "img_0001-1.png").read_bytes() == _png(14)


def test_a_watcher_restarted_after_a_power_loss_mid_line_goes_on(detector: Detector, tmp_path: Path) -> None:
    incoming, out = tmp_path / "incoming", tmp_path / "out"
    earlier = _drop(incoming / "é.png", 18)
    out.mkdir()
    line = json.dumps({"path": str(earlier.resolve()), "score": 0.5}, ensure_ascii=False).encode()
    kept = line + b"\n"
    torn = line[: line.index("é".encode()) + 1]  # cut inside the two bytes of "é"
    (out / "predictions.jsonl").write_bytes(kept + torn)
    (out / "errors.jsonl").write_bytes(torn)
    watcher = Watcher(detector, incoming, out)
    try:
        new = _drop(incoming / "new.png", 19)
        _wait_for(lambda: len(_records(out)) >= 2, "the new file's record")
    finally:
        watcher.stop()
    data = (out / "predictions.jsonl").read_bytes()
    assert data.startswith(kept) and (out / "errors.jsonl").read_bytes() == b""
    paths = [json.loads(line)["path"] for line in data.decode().splitlines()]  # every line parses
    assert paths == [str(p.resolve()) for p in (earlier, new)]  # the earlier file is recorded: not scored again


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("poll", [None, 0.1])
def test_symbolic_links_are_not_followed_out_of_the_watched_folder(
    detector: Detector,
    tmp_path: Path,
    poll: float | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="cnc_ad.deploy.watch")
    incoming, out, done, elsewhere = (tmp_path / n for n in ("incoming", "out", "done", "elsewhere"))
    _drop(elsewhere / "g.png", 15)
    _drop(elsewhere / "sub" / "h.png", 16)
    before = _tree(elsewhere)
    incoming.mkdir()
    (incoming / "link").symlink_to(elsewhere, target_is_directory=True)
    (incoming / "f.png").symlink_to(elsewhere / "g.png")
    watcher = Watcher(detector, incoming, out, after=After.parse(f"move:{done}"), poll=poll)
    try:
        (incoming / "late.png").symlink_to(elsewhere / "sub" / "h.png")  # one made while watching
        real = _drop(incoming / "real.png", 17)
        _wait_for(lambda: not real.exists(), "the move of the real file")
        time.sleep(10 * 0.1 + 2 * SETTLE_S)  # more listings and settle times: the links stay untouched
    finally:
        summary = watcher.stop()
    assert [r["path"] for r in _records(out)] == [str(real.resolve())] and summary.predicted == summary.moved == 1
    assert _tree(elsewhere) == before and _tree(done) == {"real.png": _png(17)}
    assert all((incoming / name).is_symlink() for name in ("link", "f.png", "late.png"))
    warned = [r.getMessage() for r in caplog.records if "symbolic link" in r.getMessage()]
    assert sorted(message.split()[0] for message in warned) == sorted(
        str(incoming / name) for name in ("f.png", "late.png", "link")
    )  # one warning per link


def test_polling_fallback_without_watchfiles(
    detector: Detector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watch_module, "watchfiles_available", lambda: False)
    monkeypatch.setattr(watch_module, "_watchfiles_loop", None)  # would raise if it were used
    incoming, out = tmp_path / "incoming", tmp_path / "out"
    incoming.mkdir()
    watcher = Watcher(detector, incoming, out)  # poll=None, no watchfiles: polls every 1 s
    try:
        first = _drop(incoming / "one.png", 5)
        _wait_for(lambda: len(_records(out)) >= 1, "the first record")
        second = _drop(incoming / "sub" / "two.png", 6)
        _wait_for(lambda: len(_records(out)) >= 2, "the second record")
    finally:
        summary = watcher.stop()
    assert summary.mode == "poll"
    assert sorted(r["path"] for r in _records(out)) == sorted(str(p.resolve()) for p in (first, second))


def test_explicit_poll_interval_and_an_undecodable_file_tried_again_once_it_changes(
    detector: Detector, tmp_path: Path
) -> None:
    incoming, out = tmp_path / "incoming", tmp_path / "out"
    incoming.mkdir()
    watcher = Watcher(detector, incoming, out, poll=0.1)
    try:
        broken = incoming / "broken.png"
        broken.write_bytes(_png(7)[:40])  # a writer that stalled longer than the settle time
        _wait_for(lambda: (out / "errors.jsonl").exists(), "the error record")
        time.sleep(0.05)
        broken.write_bytes(_png(7))  # the rest arrives: the file changed, so it is tried again
        _wait_for(lambda: len(_records(out)) >= 1, "the record of the completed file")
    finally:
        summary = watcher.stop()
    assert [r["path"] for r in _records(out)] == [str(broken.resolve())]
    assert len(read_jsonl(out / "errors.jsonl")) == 1
    assert summary.mode == "poll" and summary.failed == 1 and summary.predicted == 1


class Killed(BaseException):
    """Stands for a kill -9 between a file's record and its move."""


def test_move_mode_and_a_kill_between_the_record_and_the_move(
    detector: Detector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    incoming, done, out = tmp_path / "incoming", tmp_path / "done", tmp_path / "out"
    first = _drop(incoming / "first.png", 8)
    real_move = watch_module._move

    def killed(*args: Any) -> Path:
        raise Killed

    monkeypatch.setattr(watch_module, "_move", killed)
    with pytest.raises(Killed):
        watch_folder(detector, incoming, out, after=After.parse(f"move:{done}"), settle=SETTLE_S, poll=0.1)
    assert [r["path"] for r in _records(out)] == [str(first.resolve())]  # recorded ...
    assert first.exists() and not done.exists()  # ... not moved

    monkeypatch.setattr(watch_module, "_move", real_move)
    (done / "sub").mkdir(parents=True)
    (done / "sub" / "third.png").write_bytes(b"another file of that name")  # never overwritten
    watcher = Watcher(detector, incoming, out, after=After.parse(f"move:{done}"))
    try:
        _wait_for(lambda: not first.exists(), "the interrupted move")
        second = _drop(incoming / "second.png", 9)
        third = _drop(incoming / "sub" / "third.png", 10)
        _wait_for(lambda: not second.exists() and not third.exists(), "the moves of the new files")
    finally:
        summary = watcher.stop()
    assert Counter(r["path"] for r in _records(out)) == Counter(str(p.resolve()) for p in (first, second, third))
    assert (done / "first.png").read_bytes() == _png(8) and (done / "second.png").read_bytes() == _png(9)
    assert (done / "sub" / "third-1.png").read_bytes() == _png(10)
    assert (done / "sub" / "third.png").read_bytes() == b"another file of that name"
    assert summary.predicted == 2 and summary.moved == 3 and summary.recorded_before == 1


def test_a_move_across_file_systems_keeps_the_source_unless_the_copy_is_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    incoming, done = tmp_path / "incoming", tmp_path / "done"
    source = _drop(incoming / "sub" / "a.png", 12)

    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "rename", cross_device)
    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        watch_module._move(source, incoming, done)
    assert source.read_bytes() == _png(12)  # the copy may not be on disk: the source stays
    assert [p for p in done.rglob("*") if p.is_file()] == []  # and no partial copy is left behind
    monkeypatch.undo()
    monkeypatch.setattr(os, "rename", cross_device)
    assert watch_module._move(source, incoming, done) == done / "sub" / "a.png"
    assert not source.exists() and (done / "sub" / "a.png").read_bytes() == _png(12)


def test_a_move_folder_inside_the_watched_one_is_not_watched(detector: Detector, tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    out, done = incoming / "out", incoming / "done"  # both inside: neither overlays nor moved files come back
    incoming.mkdir()
    watcher = Watcher(detector, incoming, out, after=After.parse(f"move:{done}"), poll=0.1)
    try:
        part = _drop(incoming / "part.png", 11)
        _wait_for(lambda: (done / "part.png").exists(), "the move")
        # A few more listings: nothing under out/ or done/ is picked up.
        time.sleep(5 * 0.1 + SETTLE_S)
    finally:
        summary = watcher.stop()
    assert [r["path"] for r in _records(out)] == [str(part.resolve())]
    assert summary.predicted == 1


def test_a_watcher_is_refused_an_output_folder_in_use(detector: Detector, tmp_path: Path) -> None:
    incoming, out = tmp_path / "incoming", tmp_path / "out"
    incoming.mkdir()
    refused = pytest.raises(ConfigError, match=f"in use by another predictor or watcher \\(process {os.getpid()}\\)")
    with open_output(out, resume=True, overwrite=False), refused:  # a predictor writing into it
        watch_folder(detector, incoming, out, poll=0.1)


def _start(checkpoint: Path, incoming: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "cnc_ad", "predict", "--checkpoint", str(checkpoint), "--device", "cpu",
               "--watch", str(incoming), "--out", str(out), "--settle", str(SETTLE_S), *extra]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_kill_9_and_restart_score_each_file_exactly_once(checkpoint: Path, tmp_path: Path) -> None:
    incoming, out = tmp_path / "incoming", tmp_path / "out"
    incoming.mkdir()
    first_wave = [_drop(incoming / f"a{i}.png", 20 + i) for i in range(6)]
    process = _start(checkpoint, incoming, out, "--batch-size", "2")
    try:
        _wait_for(lambda: len(_records(out)) >= 1 or process.poll() is not None, "the first record")
        process.send_signal(signal.SIGKILL)  # in the middle: some files recorded, others not (or all, by then)
        process.wait(TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    recorded_at_kill = len(_records(out))
    assert recorded_at_kill >= 1
    second_wave = [_drop(incoming / "more" / f"b{i}.png", 40 + i) for i in range(3)]  # arrive while it is down

    process = _start(checkpoint, incoming, out, "--json")
    try:
        _wait_for(lambda: len(_records(out)) >= 9 or process.poll() is not None, "all 9 records")
        third = _drop(incoming / "c.png", 50)  # and one while it runs again
        _wait_for(lambda: len(_records(out)) >= 10 or process.poll() is not None, "the 10th record")
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, stderr
    summary = json.loads(stdout)  # --json: the one object on stdout
    assert summary["command"] == "predict" and summary["ok"] is True and summary["stopped_by"] == "SIGTERM"
    assert summary["done_before"] == recorded_at_kill and summary["predicted"] == 10 - recorded_at_kill
    assert "watching" in stderr and "stopped (SIGTERM)" in stderr  # status lines on stderr
    expected = Counter(str(p.resolve()) for p in [*first_wave, *second_wave, third])
    assert Counter(r["path"] for r in _records(out)) == expected


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--after", "delete"], "--after 'delete'"),
        (["--overwrite"], "always resumes"),
        (["also.png"], "takes no INPUT"),
        (["--poll", "0"], "--poll > 0"),
    ],
)
def test_bad_watch_options_are_one_line_errors(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    (tmp_path / "in").mkdir()
    argv = ["predict", "--checkpoint", str(checkpoint), "--device", "cpu", "--watch", str(tmp_path / "in"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_batch_only_options_without_watch_and_a_missing_folder(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = _drop(tmp_path / "x.png", 1)
    assert main(["predict", "--checkpoint", str(checkpoint), str(image), "--after", "leave", "--poll", "1"]) == 2
    assert "apply to --watch" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(checkpoint), "--watch", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["predict", "--checkpoint", str(checkpoint)]) == 3
    assert "no inputs" in capsys.readouterr().err
