"""Drift of the alarm rate: the binomial tail against reference values, a window at the target rate without drift, a
tripled rate flagged, F1-max thresholds reported without a test, windows restarted by a new threshold, and a monitor
that follows a decision log (and starts from its newest decisions)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from cnc_ad.deploy.decisions import Decision, DecisionLog
from cnc_ad.deploy.detector import ImageResult, ThresholdChoice
from cnc_ad.deploy.drift import DriftMonitor, binomial_tail
from cnc_ad.errors import ConfigError
from cnc_ad.thresholds import false_alarm_rate_of

# P[X >= k] for X ~ Binomial(n, p), from scipy.stats.binom.sf(k - 1, n, p) (SciPy 1.17.1) and by hand where exact.
REFERENCE = [
    (1, 10, 0.5, 1 - 1 / 1024),
    (8, 10, 0.5, 56 / 1024),
    (10, 10, 0.5, 1 / 1024),
    (3, 5, 0.9, 0.99144),
    (2, 200, 0.01, 0.5953543153279742),
    (6, 200, 0.01, 0.01602290690917754),
    (7, 200, 0.01, 0.004295542328851568),
    (10, 200, 0.01, 4.014180884713425e-05),
    (15, 200, 0.05, 0.07813441567325656),
    (30, 200, 0.05, 8.709270943980009e-08),
    (60, 1000, 0.03, 5.802225924157976e-07),
    (100, 10000, 0.01, 0.5134992717167548),
    (120, 10000, 0.01, 0.027597256302066213),
    (5, 50, 0.001, 2.0407861493411034e-09),
]
RULE = "false_alarm_rate=0.01"


@pytest.mark.parametrize(("k", "n", "p", "expected"), REFERENCE)
def test_binomial_tail_matches_reference_values(k: int, n: int, p: float, expected: float) -> None:
    assert binomial_tail(k, n, p) == pytest.approx(expected, rel=1e-9)


def test_binomial_tail_edges() -> None:
    assert binomial_tail(0, 10, 0.3) == 1.0 and binomial_tail(-2, 10, 0.3) == 1.0  # at least nothing: certain
    assert binomial_tail(11, 10, 0.3) == 0.0  # more alarms than decisions
    assert binomial_tail(1, 10, 0.0) == 0.0 and binomial_tail(10, 10, 1.0) == 1.0
    assert binomial_tail(1, 0, 0.5) == 0.0
    assert 0.0 <= binomial_tail(900, 1000, 0.01) < 1e-300  # far beyond a float64's range: no overflow, no error
    with pytest.raises(ValueError):
        binomial_tail(1, 10, 1.5)


def test_binomial_tail_against_scipy_on_a_grid() -> None:
    stats = pytest.importorskip("scipy.stats", reason="the comparison grid needs SciPy (the train extra)")
    rng = np.random.default_rng(0)
    for _ in range(400):
        n = int(rng.integers(1, 5000))
        p = float(rng.random() ** 3)
        k = int(rng.integers(0, n + 1))
        expected = float(stats.binom.sf(k - 1, n, p))
        # SciPy rounds tails below about 1e-280 to 0
        assert binomial_tail(k, n, p) == pytest.approx(expected, rel=1e-8, abs=1e-250), (k, n, p)


def test_false_alarm_rate_of_a_rule() -> None:
    assert false_alarm_rate_of("false_alarm_rate=0.01") == 0.01
    assert false_alarm_rate_of("false_alarm_rate=0.05;max+margin") == 0.05
    assert false_alarm_rate_of("false_alarm_rate=0.02;tiles=512/0.25") == 0.02
    for rule in ("f1_max", "f1_max_pooled", "request", "", None, "false_alarm_rate=x", "false_alarm_rate=2"):
        assert false_alarm_rate_of(rule) is None


def _decision(index: int, alarm: bool, category: str | None = "pump", rule: str | None = RULE, **fields) -> Decision:
    values = {
        "id": f"{index:032x}", "time": "2026-01-31T08:00:00.000Z", "source": "serve", "model": "m",
        "category": category, "name": f"part{index}.png", "image_sha256": "0" * 64, "image_digest_of": "bytes",
        "score": 0.9 if alarm else 0.1, "verdict": "anomalous" if alarm else "ok", "threshold": 0.5,
        "threshold_source": "category", "threshold_rule": rule, "threshold_images": 100, "pixel_threshold": 0.5,
        "thresholds_digest": "d" * 16, "width": 8, "height": 8,
    }  # fmt: skip
    values.update(fields)
    return Decision(**values)


def _window(monitor: DriftMonitor, alarms: int, total: int, start: int = 0, **fields) -> None:
    """``total`` decisions, ``alarms`` of them anomalous, spread evenly."""
    flags = np.zeros(total, bool)
    if alarms:
        flags[np.linspace(0, total - 1, alarms).astype(int)] = True
    for index, alarm in enumerate(flags):
        monitor.observe(_decision(start + index, bool(alarm), **fields))


def test_a_window_at_the_target_rate_shows_no_drift() -> None:
    monitor = DriftMonitor(window=1000, alpha=0.001)
    _window(monitor, 10, 1000)  # 1 % alarms, as the threshold was set for
    found = monitor.snapshot()["pump"]
    assert (found.decisions, found.alarms, found.observed_rate, found.target_rate) == (1000, 10, 0.01, 0.01)
    assert found.p_value == pytest.approx(binomial_tail(10, 1000, 0.01)) and found.p_value > 0.4
    assert found.drift is False


def test_a_tripled_alarm_rate_is_drift(caplog: pytest.LogCaptureFixture) -> None:
    monitor = DriftMonitor(window=1000, alpha=0.001)
    _window(monitor, 10, 1000)
    _window(monitor, 30, 1000, start=1000)  # the window slides: the last 1000 hold 3 % alarms
    found = monitor.snapshot()["pump"]
    assert (found.decisions, found.alarms) == (1000, 30)
    assert found.p_value == pytest.approx(binomial_tail(30, 1000, 0.01)) and found.p_value < 1e-5
    assert found.drift is True
    assert any("drift in category pump: " in r.getMessage() for r in caplog.records)  # said when it began
    _window(monitor, 10, 1000, start=2000)  # back to 1 %: the flag goes down
    assert monitor.snapshot()["pump"].drift is False


def test_the_default_window_flags_a_4_5_fold_rate_at_one_percent() -> None:
    monitor = DriftMonitor()  # 200 decisions, alpha 0.001
    for index in range(200):
        monitor.observe(_decision(index, index >= 192))  # 8 alarms, the newest
    assert monitor.snapshot()["pump"].drift is False  # p = 0.0011
    monitor.observe(_decision(200, True))  # 9 of the last 200 (the oldest, an ok, left)
    assert monitor.snapshot()["pump"].alarms == 9 and monitor.snapshot()["pump"].drift is True


def test_f1_max_thresholds_get_their_rate_and_no_test() -> None:
    monitor = DriftMonitor(window=50)
    _window(monitor, 25, 50, rule="f1_max")
    found = monitor.snapshot()["pump"]
    assert (found.observed_rate, found.target_rate, found.p_value, found.drift) == (0.5, None, None, None)


def test_windows_are_per_category_and_restart_with_a_new_threshold() -> None:
    monitor = DriftMonitor(window=100)
    _window(monitor, 30, 60, category="valve")
    _window(monitor, 1, 60, start=100, category=None)  # no category: the shared threshold's window
    monitor.observe(_decision(500, False, threshold_source="request", rule="request"))  # not the stored threshold
    monitor.observe(_decision(501, False, verdict="none", threshold=None, threshold_source=None))  # no threshold
    found = monitor.snapshot()
    assert sorted(found) == ["__all__", "valve"]
    assert found["valve"].drift is True and found["__all__"].alarms == 1
    _window(monitor, 0, 5, start=600, category="valve", threshold=0.7)  # a reloaded threshold: counted afresh
    assert (monitor.snapshot()["valve"].decisions, monitor.snapshot()["valve"].alarms) == (5, 0)
    assert monitor.snapshot()["valve"].threshold == 0.7


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="window"):
        DriftMonitor(window=0)
    with pytest.raises(ConfigError, match="alpha"):
        DriftMonitor(alpha=1.5)


def test_a_monitor_follows_a_decision_log_and_starts_from_its_newest(tmp_path: Path) -> None:
    choice = ThresholdChoice(0.5, 0.5, "category", "false_alarm_rate=0.05", 40, "abcdef0123456789")

    def record(log: DecisionLog, score: float) -> None:
        result = ImageResult(score, np.full((2, 2), score, np.float32), (8, 8), 0.5, 0.5)
        log.record(result, choice, name="part.png", image=np.zeros((8, 8, 3), np.uint8), category="pump")

    with DecisionLog(tmp_path / "log", source="serve") as log:
        for k in range(4):
            record(log, 0.9 if k == 0 else 0.1)
    with DecisionLog(tmp_path / "log", source="serve") as log:  # a restart: the window goes on
        monitor = DriftMonitor(window=10)
        stop = monitor.follow(log)
        assert (monitor.snapshot()["pump"].decisions, monitor.snapshot()["pump"].alarms) == (4, 1)
        for _ in range(3):
            record(log, 0.9)
        found = monitor.snapshot()["pump"]
        assert (found.decisions, found.alarms, found.target_rate) == (7, 4, 0.05)
        assert found.p_value == pytest.approx(binomial_tail(4, 7, 0.05))
        assert math.isclose(monitor.to_json()["categories"]["pump"]["observed_rate"], 4 / 7)
        stop()
        record(log, 0.9)
        assert monitor.snapshot()["pump"].decisions == 7
