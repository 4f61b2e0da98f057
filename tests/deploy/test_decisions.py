"""The decision log: durable records with every field, kept images and overlays, rotation and the size cap, a torn last
line, corrections, one writer per folder, subscribers, and the readers `cnc decisions` and calibration use."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnc_ad.deploy import decisions as decisions_module
from cnc_ad.deploy.decisions import (
    FEEDBACK_FILE,
    LOG_FILE,
    Decision,
    DecisionLog,
    UnknownDecision,
    confirmed,
    kept_path,
    parse_since,
    read_decisions,
    read_feedback,
    segments,
    select_decisions,
)
from cnc_ad.deploy.detector import ImageResult, ThresholdChoice
from cnc_ad.errors import ConfigError, DataError
from cnc_ad.files import read_jsonl

CHOICE = ThresholdChoice(0.5, 0.6, "category", "false_alarm_rate=0.01;max+margin", 12, "abcdef0123456789")


def _result(score: float, threshold: float | None = 0.5, size: tuple[int, int] = (12, 16)) -> ImageResult:
    return ImageResult(score, np.full((4, 4), score, np.float32), size, threshold, None if threshold is None else 0.6)


def _png(seed: int, size: tuple[int, int] = (12, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _overlay() -> np.ndarray:
    return np.full((4, 4, 3), 200, np.uint8)


def _folder_bytes(folder: Path) -> int:
    """What the cap counts: segments and kept files (not the feedback file or the lock)."""
    total = sum(p.stat().st_size for p in segments(folder))
    for name in ("images", "overlays"):
        total += sum(p.stat().st_size for p in (folder / name).glob("*")) if (folder / name).is_dir() else 0
    return total


def test_every_decision_is_one_durable_record_with_every_field(tmp_path: Path) -> None:
    seen: list[tuple[Decision, int]] = []
    with DecisionLog(tmp_path / "log", source="serve", model="0123456789abcdef") as log:
        # A subscriber is called once the line is on disk: it reads the log itself.
        log.subscribe(lambda d: seen.append((d, len(read_jsonl(tmp_path / "log" / LOG_FILE)))))
        data = _png(1)
        flagged = log.record(_result(0.7), CHOICE, name="part1.png", image=data, category="brick")
        passed = log.record(_result(0.2), CHOICE, name="part2.png", image=_png(2), category="brick")
        pixels = np.zeros((12, 16, 3), np.uint8)
        undecided = log.record(_result(0.2, None), ThresholdChoice(None, None), name="array", image=pixels)
    assert [d.verdict for d in (flagged, passed, undecided)] == ["anomalous", "ok", "none"]
    assert [count for _, count in seen] == [1, 2, 3] and [d for d, _ in seen] == [flagged, passed, undecided]
    records = read_jsonl(tmp_path / "log" / LOG_FILE)
    assert [Decision.from_json(r) for r in records] == [flagged, passed, undecided]
    first = records[0]
    assert re.fullmatch(r"[0-9a-f]{32}", first["id"]) and len({r["id"] for r in records}) == 3
    assert first["time"].endswith("Z") and abs(datetime.now(timezone.utc) - flagged.when) < timedelta(minutes=1)
    assert first["image_sha256"] == hashlib.sha256(data).hexdigest() and first["image_digest_of"] == "bytes"
    assert records[2]["image_sha256"] == hashlib.sha256(pixels.tobytes()).hexdigest()
    assert records[2]["image_digest_of"] == "pixels"
    assert {k: first[k] for k in ("source", "model", "category", "name", "score", "threshold", "threshold_source",
                                  "threshold_rule", "threshold_images", "pixel_threshold", "thresholds_digest",
                                  "width", "height", "image", "overlay")} == {
        "source": "serve", "model": "0123456789abcdef", "category": "brick", "name": "part1.png",
        "score": pytest.approx(0.7), "threshold": 0.5, "threshold_source": "category",
        "threshold_rule": "false_alarm_rate=0.01;max+margin", "threshold_images": 12, "pixel_threshold": 0.6,
        "thresholds_digest": "abcdef0123456789", "width": 16, "height": 12, "image": None, "overlay": None,
    }  # fmt: skip
    assert records[2]["threshold"] is None and records[2]["threshold_rule"] is None
    # Unknown keys (a later version's) are ignored; a line that is no decision is skipped.
    assert Decision.from_json({**first, "drift": 0.3}) == flagged and Decision.from_json({"id": "x"}) is None


@pytest.mark.parametrize("keep", ["none", "anomalous", "all"])
def test_keep_says_which_images_and_overlays_are_kept(keep: str, tmp_path: Path) -> None:
    drawn: list[str] = []

    def overlay() -> np.ndarray:
        drawn.append("overlay")
        return _overlay()

    source = tmp_path / "part.jpg"
    Image.fromarray(np.full((12, 16, 3), 90, np.uint8)).save(source)
    with DecisionLog(tmp_path / "log", source="predict", keep=keep) as log:  # type: ignore[arg-type]
        flagged = log.record(_result(0.7), CHOICE, name="a.png", image=_png(1), overlay=overlay)
        passed = log.record(_result(0.2), CHOICE, name=str(source), image=source, overlay=overlay)
    kept = {"none": [], "anomalous": [flagged], "all": [flagged, passed]}[keep]
    assert len(drawn) == len(kept)  # the overlay is drawn only when it is kept
    for decision in (flagged, passed):
        image, shown = kept_path(tmp_path / "log", decision), kept_path(tmp_path / "log", decision, "overlay")
        if decision in kept:
            assert image is not None and shown is not None and shown.suffix == ".jpg"
            assert np.abs(np.asarray(Image.open(shown), int) - 200).max() <= 2  # the overlay, as JPEG
            expected = _png(1) if decision is flagged else source.read_bytes()  # the bytes as received
            assert image.read_bytes() == expected and image.suffix == (".png" if decision is flagged else ".jpg")
        else:
            assert image is None and shown is None and decision.image is None
    assert passed.image_sha256 == hashlib.sha256(source.read_bytes()).hexdigest()  # a file's digest: its bytes


def test_rotation_and_the_size_cap_remove_the_oldest_first(tmp_path: Path) -> None:
    folder = tmp_path / "log"
    image = _png(5, (40, 40))  # ~5 KB each
    cap, segment = 60_000, 4_000
    ids = []
    with DecisionLog(folder, source="serve", keep="all", max_bytes=cap, segment_bytes=segment) as log:
        for k in range(60):
            ids.append(log.record(_result(0.7), CHOICE, name=f"p{k}.png", image=image, overlay=_overlay).id)
            assert log.stored_bytes == _folder_bytes(folder) <= cap, k  # counted as on disk, never over the cap
    numbered = [p.name for p in segments(folder)][:-1]
    assert numbered and all(re.fullmatch(r"decisions\.\d+\.jsonl", n) for n in numbered)
    assert [int(n.split(".")[1]) for n in numbered] == sorted(int(n.split(".")[1]) for n in numbered)
    assert (folder / LOG_FILE).stat().st_size < segment + 2_000
    kept = [d for d in read_decisions(folder) if kept_path(folder, d) is not None]
    logged = [d.id for d in read_decisions(folder)]
    # The newest images are kept, the oldest removed first; records outlive their images; old segments went too.
    assert kept and [d.id for d in kept] == ids[-len(kept) :] and len(kept) < 60
    assert len(logged) > len(kept) and logged == ids[-len(logged) :] and len(logged) < 60
    assert "decisions.1.jsonl" not in os.listdir(folder)
    # Reopened, the log counts what lies on disk (and stays under the cap).
    with DecisionLog(folder, source="serve", keep="all", max_bytes=cap, segment_bytes=segment) as log:
        assert log.stored_bytes == _folder_bytes(folder)
        log.record(_result(0.7), CHOICE, name="again.png", image=image, overlay=_overlay)
        assert log.stored_bytes == _folder_bytes(folder) <= cap
    # A smaller cap on opening removes the excess at once.
    with DecisionLog(folder, source="serve", max_bytes=10_000, segment_bytes=segment) as log:
        assert log.stored_bytes == _folder_bytes(folder) <= 10_000


@pytest.mark.parametrize("cut", ["in_json", "in_utf8"])
def test_a_torn_last_line_is_skipped_and_cut_off_on_reopening(cut: str, tmp_path: Path) -> None:
    folder = tmp_path / "log"
    with DecisionLog(folder, source="watch") as log:
        first = log.record(_result(0.7), CHOICE, name="erste.png", image=_png(1))
        log.record(_result(0.2), CHOICE, name="straße.png", image=_png(2))
    whole = (folder / LOG_FILE).read_bytes()
    last = whole.splitlines(keepends=True)[-1]
    at = last.index("ß".encode()) + 1 if cut == "in_utf8" else len(last) // 2  # a power loss inside the last line
    (folder / LOG_FILE).write_bytes(whole[: len(whole) - len(last)] + last[:at])
    assert [d.id for d in read_decisions(folder)] == [first.id]  # the torn line is skipped
    with DecisionLog(folder, source="watch") as log:  # reopened: the torn tail is cut off before appending
        third = log.record(_result(0.3), CHOICE, name="dritte.png", image=_png(3))
    assert [d.id for d in read_decisions(folder)] == [first.id, third.id]
    (folder / FEEDBACK_FILE).write_bytes(b'{"decision": "' + first.id.encode() + b'", "label": "go')
    assert read_feedback(folder) == {}


def test_corrections_are_durable_and_the_last_one_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decisions_module, "RECENT", 3)  # older decisions are looked up on disk
    folder = tmp_path / "log"
    events = []
    with DecisionLog(folder, source="serve", segment_bytes=1_500) as log:
        log.subscribe_feedback(events.append)
        made = [log.record(_result(s), CHOICE, name=f"p{k}.png", image=_png(k), category="brick")
                for k, s in enumerate([0.7, 0.2, 0.6, 0.1, 0.3])]  # fmt: skip
        assert len(segments(folder)) > 1
        alarm = log.add_feedback(made[0].id, "good", note="scratch on the fixture, not the part")
        missed = log.add_feedback(made[1].id, "defect")
        assert (alarm.correction, missed.correction) == ("false_alarm", "missed_defect")
        assert log.add_feedback(made[2].id, "defect").correction is None  # confirmed
        log.add_feedback(made[2].id, "good")  # changed their mind: the last counts
        with pytest.raises(UnknownDecision, match="no decision"):
            log.add_feedback("0" * 32, "good")
        with pytest.raises(UnknownDecision):
            log.add_feedback("../../etc/passwd", "good")
        with pytest.raises(DataError, match="label"):
            log.add_feedback(made[3].id, "fine")
        assert [e.decision for e in events] == [made[0].id, made[1].id, made[2].id, made[2].id]
        assert log.feedback(made[2].id).label == "good"
        recent = log.recent(10)
        assert [d.id for d, _ in recent] == [d.id for d in reversed(made[-3:])]  # newest first, from memory
        assert recent[2][1] is not None and recent[2][1].label == "good"
        assert [d.id for d, _ in log.recent(1, verdict="ok")] == [made[4].id]
    feedback = read_feedback(folder)
    assert {k: f.label for k, f in feedback.items()} == {made[0].id: "good", made[1].id: "defect", made[2].id: "good"}
    assert feedback[made[0].id].note == "scratch on the fixture, not the part"
    assert [c.decision.id for c in confirmed(folder, "good")] == [made[0].id, made[2].id]
    assert [c.decision.id for c in confirmed(folder, "defect", category="brick")] == [made[1].id]
    assert confirmed(folder, "good", category="washer") == []
    with DecisionLog(folder, source="serve") as log:  # reopened: the corrections and recent decisions are back
        assert log.feedback(made[1].id).label == "defect" and log.find(made[0].id) == made[0]


def test_one_writer_per_folder(tmp_path: Path) -> None:
    refused = pytest.raises(ConfigError, match=f"in use by another writer \\(process {os.getpid()}\\)")
    with DecisionLog(tmp_path / "log", source="serve"), refused:
        DecisionLog(tmp_path / "log", source="predict")
    DecisionLog(tmp_path / "log", source="predict").close()  # released
    for bad in ({"source": "camera"}, {"source": "serve", "keep": "some"}, {"source": "serve", "max_bytes": 0}):
        with pytest.raises(ConfigError):
            DecisionLog(tmp_path / "other", **bad)  # type: ignore[arg-type]


def test_a_failing_subscriber_costs_no_decision(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def broken(decision: Decision) -> None:
        calls.append(decision.id)
        raise RuntimeError("the outbox is down")

    with DecisionLog(tmp_path / "log", source="serve") as log:
        unsubscribe = log.subscribe(broken)
        decision = log.record(_result(0.7), CHOICE, name="a.png", image=_png(1))
        unsubscribe()
        log.record(_result(0.7), CHOICE, name="b.png", image=_png(2))
    assert calls == [decision.id] and len(list(read_decisions(tmp_path / "log"))) == 2
    assert "subscriber failed" in caplog.text


def test_selecting_by_time_category_and_verdict(tmp_path: Path) -> None:
    now = datetime(2026, 1, 31, 12, 0, tzinfo=timezone.utc)
    assert parse_since("2h", now) == now - timedelta(hours=2)
    assert parse_since("1d12h", now) == now - timedelta(days=1, hours=12)
    assert parse_since("90s", now) == now - timedelta(seconds=90)
    assert parse_since("2026-01-30T08:00", now) == datetime(2026, 1, 30, 8, 0, tzinfo=timezone.utc)
    assert parse_since("2026-01-30T08:00+01:00", now) == datetime(2026, 1, 30, 7, 0, tzinfo=timezone.utc)
    for bad in ("yesterday", "2x", "h"):
        with pytest.raises(ConfigError, match="ISO 8601"):
            parse_since(bad, now)
    with DecisionLog(tmp_path / "log", source="serve") as log:
        a = log.record(_result(0.7), CHOICE, name="a", image=b"a", category="brick")
        b = log.record(_result(0.2), CHOICE, name="b", image=b"b", category="washer")
    old = Decision.from_json({**a.to_json(), "id": "1" * 32, "time": "2020-01-01T00:00:00Z"})
    every = [old, a, b]
    assert list(select_decisions(every, since=parse_since("1h"))) == [a, b]
    assert list(select_decisions(every, category="brick")) == [old, a]
    assert list(select_decisions(every, verdict="ok")) == [b]
    with pytest.raises(ConfigError, match="verdict"):
        list(select_decisions(every, verdict="bad"))
    with pytest.raises(DataError, match="no decision log"):
        list(read_decisions(tmp_path / "nothing"))


def test_the_log_never_imports_torch() -> None:
    import subprocess
    import sys

    code = "import sys, cnc_ad.deploy.decisions; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_records_are_plain_json_lines(tmp_path: Path) -> None:
    with DecisionLog(tmp_path / "log", source="predict", model=None) as log:
        log.record(_result(float("nan")), CHOICE, name="nan.png", image=b"x")
    line = (tmp_path / "log" / LOG_FILE).read_text().strip()
    assert json.loads(line)["score"] is None and "NaN" not in line


def test_an_image_file_gone_before_its_record_is_a_data_error(tmp_path: Path) -> None:
    with DecisionLog(tmp_path / "log", source="watch", keep="all") as log:
        for keep in ("none", "all"):
            log.keep = keep  # type: ignore[assignment]
            with pytest.raises(DataError, match="removed before its decision was recorded"):
                log.record(_result(0.7), CHOICE, name="gone.png", image=tmp_path / "gone.png")
    assert not (tmp_path / "log" / LOG_FILE).exists() and not list((tmp_path / "log").glob("images/*"))
