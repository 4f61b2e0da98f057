"""Drift of a station's alarm rate: per category, the share of alarms among its last decisions against the false-alarm
rate its threshold was set for, with a one-sided binomial test.

A threshold set on good parts at a false-alarm rate R (rule ``"false_alarm_rate=R"``, :mod:`cnc_ad.deploy.calibrate`)
calls about a share R of good parts anomalous. When the alarms among the last ``window`` decisions of a category are
more than R explains (the probability of at least that many alarms out of that many decisions at rate R, the p-value,
is below ``alpha``), something changed: the parts (a run of defects), the camera or the light (false alarms), or the
model's inputs. That is drift: a signal to look, not a verdict on its cause.

Only decisions made by stored thresholds count: a decision without a threshold (verdict ``"none"``) or with a
threshold given by the request says nothing about the stored one. A category's window starts afresh when the threshold
its decisions were made by changes (a reload, new thresholds). Thresholds without a target rate (F1-max, set on
labelled defects) get their rate reported and no test.

The binomial tail is computed exactly with the standard library (a station has no SciPy): the terms of the
probability mass function summed in log-space scale from the one nearest the mean outward, until they no longer count.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from cnc_ad.deploy.decisions import RECENT, Decision, DecisionLog
from cnc_ad.errors import ConfigError
from cnc_ad.thresholds import ALL, false_alarm_rate_of

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 200
"""Decisions per category that the alarm rate is measured over (the newest)."""
DEFAULT_ALPHA = 0.001
"""Drift is flagged when the p-value of the alarms in the window is below this."""
_NEGLIGIBLE = 1e-17  # a term this small against the sum so far no longer changes a float64
_COUNTED_SOURCES = frozenset({"category", ALL})  # decisions made by stored thresholds


def binomial_tail(k: int, n: int, p: float) -> float:
    """``P[X >= k]`` for ``X ~ Binomial(n, p)``: the chance of at least ``k`` alarms in ``n`` decisions at rate ``p``.

    Exact to float64 rounding for any ``n``: the terms ``C(n, i) p^i (1-p)^(n-i)`` are summed from the one nearest the
    mean outward (they only fall from there), relative to the first, with ``math.lgamma`` for the binomial coefficient,
    so neither the coefficients overflow nor the small terms underflow before they are added. When ``k`` is at or below
    the mean, the upper tail is one minus the lower tail ``P[X <= k - 1]``, summed the same way.

    Raises:
        ValueError: ``n < 0`` or ``p`` outside [0, 1].
    """
    if n < 0 or not 0.0 <= p <= 1.0:
        raise ValueError(f"binomial_tail needs n >= 0 and 0 <= p <= 1, got n={n}, p={p}")
    if k <= 0:
        return 1.0
    if k > n or p == 0.0:
        return 0.0
    if p == 1.0:
        return 1.0
    if k > n * p:
        return _tail_sum(k, n, p, step=1)
    return max(0.0, 1.0 - _tail_sum(k - 1, n, p, step=-1))


def _tail_sum(start: int, n: int, p: float, step: int) -> float:
    """The sum of the binomial probabilities from ``start`` away from the mean (``step`` +1: up to n; -1: down to 0)."""
    log_first = (
        math.lgamma(n + 1) - math.lgamma(start + 1) - math.lgamma(n - start + 1)
        + start * math.log(p) + (n - start) * math.log1p(-p)
    )  # fmt: skip
    odds = p / (1.0 - p)
    total, term, i = 1.0, 1.0, start
    while (i < n) if step > 0 else (i > 0):
        # P[i + 1] / P[i] = (n - i) / (i + 1) * odds; P[i - 1] / P[i] = i / (n - i + 1) / odds
        term *= (n - i) / (i + 1) * odds if step > 0 else i / (n - i + 1) / odds
        i += step
        total += term
        if term < _NEGLIGIBLE * total:
            break
    return math.exp(log_first + math.log(total))  # 0.0 when too small for a float64


@dataclass(frozen=True)
class CategoryDrift:
    """The alarm rate of one category over its window, against its threshold's target.

    Attributes:
        category: the category (``__all__``: decisions made without one, by the shared threshold).
        decisions: decisions in the window (up to the monitor's window size).
        alarms: anomalous verdicts among them.
        observed_rate: ``alarms / decisions`` (None before the first decision).
        threshold: the threshold they were made by.
        rule: its rule (how it was set).
        target_rate: the false-alarm rate it was set for; None for a rule without one (F1-max).
        p_value: the chance of at least ``alarms`` alarms in ``decisions`` decisions at ``target_rate``
            (:func:`binomial_tail`); None without a target.
        drift: ``p_value < alpha``; None without a target (no test).
    """

    category: str
    decisions: int
    alarms: int
    observed_rate: float | None
    threshold: float | None
    rule: str | None
    target_rate: float | None
    p_value: float | None
    drift: bool | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class _Window:
    """The newest verdicts of one category, made by one threshold."""

    def __init__(self, size: int, threshold: float | None, rule: str | None) -> None:
        self.alarms: deque[bool] = deque(maxlen=size)
        self.count = 0
        self.threshold = threshold
        self.rule = rule
        self.drift = False

    def add(self, alarm: bool) -> None:
        if len(self.alarms) == self.alarms.maxlen:
            self.count -= self.alarms[0]
        self.alarms.append(alarm)
        self.count += alarm


class DriftMonitor:
    """The alarm rate of each category over its newest decisions, tested against its threshold's false-alarm rate.

    Feed it decisions with :meth:`observe`, or let it follow a decision log (:meth:`follow`); read it with
    :meth:`snapshot` from any thread.

    Args:
        window: decisions per category the rate is measured over (the newest), at least 1.
        alpha: drift is flagged when the p-value is below this, in (0, 1).
    """

    def __init__(self, window: int = DEFAULT_WINDOW, alpha: float = DEFAULT_ALPHA) -> None:
        if window < 1:
            raise ConfigError(f"drift window must be at least 1 decision, got {window}")
        if not 0.0 < alpha < 1.0:
            raise ConfigError(f"drift alpha must be in (0, 1), got {alpha}")
        self.window = window
        self.alpha = alpha
        self._windows: dict[str, _Window] = {}
        self._mutex = threading.Lock()

    def follow(self, decisions: DecisionLog) -> Callable[[], None]:
        """Start afresh from the log's newest decisions in memory (up to :data:`~cnc_ad.deploy.decisions.RECENT`, so
        a restart keeps the windows), then observe every new one; returns a function that stops following.

        Call it before the log records from other threads (a decision recorded in between would be missed).
        """
        with self._mutex:
            self._windows.clear()
        for decision, _ in reversed(decisions.recent(RECENT)):
            self.observe(decision)
        return decisions.subscribe(self.observe)

    def observe(self, decision: Decision) -> None:
        """Count one decision (quick: called by the decision log in its recording thread)."""
        if decision.verdict not in ("anomalous", "ok") or decision.threshold_source not in _COUNTED_SOURCES:
            return
        category = decision.category or ALL
        with self._mutex:
            window = self._windows.get(category)
            if window is None or (window.threshold, window.rule) != (decision.threshold, decision.threshold_rule):
                window = self._windows[category] = _Window(self.window, decision.threshold, decision.threshold_rule)
            window.add(decision.verdict == "anomalous")
            found = self._measure(category, window)
            flagged, window.drift = window.drift, bool(found.drift)
        if found.drift and not flagged:
            log.warning(
                "drift in category %s: %d alarms in the last %d decisions (%.2g), against %.2g for its threshold "
                "(%s); p = %.2g",
                category, found.alarms, found.decisions, found.observed_rate, found.target_rate, found.rule,
                found.p_value,
            )  # fmt: skip

    def _measure(self, category: str, window: _Window) -> CategoryDrift:
        n, k = len(window.alarms), window.count
        target = false_alarm_rate_of(window.rule)
        p_value = binomial_tail(k, n, target) if target is not None and n else None
        return CategoryDrift(
            category=category,
            decisions=n,
            alarms=k,
            observed_rate=k / n if n else None,
            threshold=window.threshold,
            rule=window.rule,
            target_rate=target,
            p_value=p_value,
            drift=None if p_value is None else p_value < self.alpha,
        )

    def snapshot(self) -> dict[str, CategoryDrift]:
        """Every category's window now, by category (sorted)."""
        with self._mutex:
            return {name: self._measure(name, self._windows[name]) for name in sorted(self._windows)}

    def to_json(self) -> dict[str, Any]:
        """What ``GET /v1/stats`` shows under ``"drift"``: the settings and every category's window."""
        return {
            "window": self.window,
            "alpha": self.alpha,
            "categories": {name: found.to_json() for name, found in self.snapshot().items()},
        }
