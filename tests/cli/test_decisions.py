"""`cnc decisions DIR`: the table, filters by time (ISO 8601 or a span back from now), category and verdict, the newest
N, corrections shown, --json, and one-line errors."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from cnc_ad.deploy.decisions import LOG_FILE, DecisionLog
from cnc_ad.deploy.detector import ImageResult, ThresholdChoice
from cnc_ad.files import read_jsonl
from tests.helpers import run_cli

CHOICE = ThresholdChoice(0.5, 0.5, "category", "false_alarm_rate=0.01", 150, "0123456789abcdef")


@pytest.fixture
def log_folder(tmp_path: Path) -> tuple[Path, list[str]]:
    """Five decisions made 5 days, 3 days, 5 hours, 1 hour and 1 minute ago (times rewritten: the log stamps "now"),
    with a false alarm and a missed defect marked."""
    folder = tmp_path / "decisions"
    made = [(5 * 24 * 60, "brick", 0.7), (3 * 24 * 60, "washer", 0.2), (5 * 60, "brick", 0.9), (60, "brick", 0.1),
            (1, "washer", 0.8)]  # fmt: skip
    with DecisionLog(folder, source="serve") as log:
        ids = []
        for minutes, category, score in made:
            result = ImageResult(score, np.zeros((2, 2), np.float32), (8, 8), 0.5, 0.5)
            ids.append(log.record(result, CHOICE, name=f"{category}-{minutes}.png", image=b"%d" % minutes,
                                  category=category).id)  # fmt: skip
        log.add_feedback(ids[2], "good")  # anomalous, but good: a false alarm
        log.add_feedback(ids[3], "defect")  # ok, but defective: a missed defect
    now = datetime.now(timezone.utc)
    records = read_jsonl(folder / LOG_FILE)
    for record, (minutes, _, _) in zip(records, made, strict=True):
        record["time"] = (now - timedelta(minutes=minutes)).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    (folder / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder, ids


def _listed(folder: Path, *options: str) -> dict:
    done = run_cli("decisions", folder, "--json", *options)
    assert done.code == 0, done.err
    return json.loads(done.out)


def test_filters_by_time_category_and_verdict(log_folder: tuple[Path, list[str]]) -> None:
    folder, ids = log_folder
    every = _listed(folder)
    assert [d["id"] for d in every["decisions"]] == ids and every["command"] == "decisions" and every["ok"] is True
    assert every["count"] == 5 and every["verdicts"] == {"anomalous": 3, "ok": 2, "none": 0}
    assert (every["false_alarms"], every["missed_defects"]) == (1, 1)
    assert [d["id"] for d in _listed(folder, "--since", "2h")["decisions"]] == ids[3:]
    assert [d["id"] for d in _listed(folder, "--since", "4d")["decisions"]] == ids[1:]
    since = (datetime.now(timezone.utc) - timedelta(hours=6)).strftime("%Y-%m-%dT%H:%M")
    assert [d["id"] for d in _listed(folder, "--since", since)["decisions"]] == ids[2:]
    assert [d["id"] for d in _listed(folder, "--category", "brick")["decisions"]] == [ids[0], ids[2], ids[3]]
    assert [d["id"] for d in _listed(folder, "--verdict", "ok")["decisions"]] == [ids[1], ids[3]]
    both = _listed(folder, "--category", "brick", "--verdict", "anomalous", "--since", "1w")
    assert [d["id"] for d in both["decisions"]] == [ids[0], ids[2]]
    assert [d["id"] for d in _listed(folder, "--limit", "2")["decisions"]] == ids[-2:]  # the newest two
    marked = _listed(folder)["decisions"][2]
    assert marked["feedback"]["label"] == "good" and marked["feedback"]["correction"] == "false_alarm"
    assert marked["threshold_rule"] == "false_alarm_rate=0.01" and marked["threshold_images"] == 150


def test_the_table(log_folder: tuple[Path, list[str]]) -> None:
    folder, ids = log_folder
    done = run_cli("decisions", folder, "--since", "6h")
    assert done.code == 0, done.err
    lines = done.out.splitlines()
    assert lines[0].startswith("| time (UTC) | verdict | score | threshold | rule (images) |")
    assert len(lines) == 2 + 3 + 1  # header, rule, three rows, the summary
    assert ids[2] in lines[2] and "good: FALSE ALARM" in lines[2] and "false_alarm_rate=0.01 (150)" in lines[2]
    assert "defect: MISSED DEFECT" in lines[3] and "| ok |" in lines[3]
    assert lines[-1].startswith("3 decision(s) (2 anomalous, 1 ok, 0 without a threshold); corrections: 1 false alarm")


def test_errors_are_one_line(log_folder: tuple[Path, list[str]], tmp_path: Path) -> None:
    folder, _ = log_folder
    for argv, code, text in [
        ((folder, "--since", "yesterday"), 2, "--since"),
        ((folder, "--limit", "-1"), 2, "--limit"),
        ((tmp_path / "empty",), 3, "no decision log"),
    ]:
        done = run_cli("decisions", *argv)
        assert done.code == code and done.err.count("\n") == 1 and text in done.err, done.err
