"""Prometheus metrics of the server (``GET /metrics``, through prometheus-client, the ``serve`` extra).

Counted as they happen:

- ``cnc_http_requests_total{route, method, status}``: every answered HTTP request (refusals of the guard too), by
  route template (``/v1/decisions/{decision_id}/{kind}``; ``other`` for paths without a route);
- ``cnc_http_errors_total{route, code}``: error answers (status 400 and above) by the code of their JSON error
  (``busy``, ``timeout``, ``model_error``, ``unauthorized``, ...; ``unknown`` without one);
- ``cnc_http_request_duration_seconds{route}``: a histogram of the time from a request's headers to its answer;
- ``cnc_decisions_total{category, verdict}`` and ``cnc_alarms_total{category}``: the decisions recorded in the
  decision log since the server started (``__all__``: without a category).

Read when scraped: the batcher's counters (``cnc_model_calls_total``, ``cnc_images_scored_total``,
``cnc_model_failures_total``, ``cnc_model_queue``), ``cnc_requests_in_progress``, the drift of each category
(``cnc_drift``: 1 when flagged, 0 when not, absent without a target rate; ``cnc_drift_alarm_rate``,
``cnc_drift_target_rate``, ``cnc_drift_p_value``, ``cnc_drift_window_decisions``) and the outbox per destination
(``cnc_outbox_pending``, ``cnc_outbox_sent_total``, ``cnc_outbox_failures_total``).

Each application has its own registry, so several servers in one process never share counters.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.routing import BaseRoute, Match

from cnc_ad.deploy.decisions import Decision
from cnc_ad.deploy.drift import DriftMonitor
from cnc_ad.deploy.outbox import Outbox
from cnc_ad.deploy.serve.batcher import Batcher
from cnc_ad.deploy.serve.guard import Load
from cnc_ad.thresholds import ALL

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Any], Callable[[Message], Any]], Any]

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
OTHER_ROUTE = "other"
_ERROR_BODY_BYTES = 4096  # the most of an error answer's body read for its code


class ServerMetrics:
    """The server's metrics and their registry.

    Args:
        batcher: the model worker whose counters are read when scraped.
        load: the requests in progress.
        drift: the drift monitor, or None (no decision log).
        outbox: the outbox, or None.
    """

    def __init__(self, batcher: Batcher, load: Load, drift: DriftMonitor | None, outbox: Outbox | None) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "cnc_http_requests", "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"], registry=registry,
        )  # fmt: skip
        self.errors = Counter(
            "cnc_http_errors", "error answers, by route template and the code of the JSON error", ["route", "code"],
            registry=registry,
        )  # fmt: skip
        self.latency = Histogram(
            "cnc_http_request_duration_seconds", "time from a request's headers to its answer, by route template",
            ["route"], buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        self.decisions = Counter(
            "cnc_decisions", "decisions recorded in the decision log, by category and verdict", ["category", "verdict"],
            registry=registry,
        )  # fmt: skip
        self.alarms = Counter("cnc_alarms", "anomalous verdicts recorded, by category", ["category"], registry=registry)
        self.registry.register(_StateCollector(batcher, load, drift, outbox))

    def observe_decision(self, decision: Decision) -> None:
        """Count one recorded decision (a decision log subscriber: quick)."""
        category = decision.category or ALL
        self.decisions.labels(category, decision.verdict).inc()
        if decision.verdict == "anomalous":
            self.alarms.labels(category).inc()

    def observe_request(self, route: str, method: str, status: int, code: str | None, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        if code is not None:
            self.errors.labels(route, code).inc()
        self.latency.labels(route).observe(seconds)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _StateCollector:
    """The metrics read from the server's parts when scraped."""

    def __init__(self, batcher: Batcher, load: Load, drift: DriftMonitor | None, outbox: Outbox | None) -> None:
        self.batcher = batcher
        self.load = load
        self.drift = drift
        self.outbox = outbox

    def collect(self) -> Iterator[Metric]:
        stats = self.batcher.stats
        yield CounterMetricFamily("cnc_model_calls", "model calls (batches)", value=stats.model_calls)
        yield CounterMetricFamily("cnc_images_scored", "images scored by the model", value=stats.images)
        yield CounterMetricFamily("cnc_model_failures", "model calls that failed", value=stats.failed_calls)
        yield GaugeMetricFamily("cnc_model_queue", "images waiting for the model", value=self.batcher.pending)
        yield GaugeMetricFamily("cnc_requests_in_progress", "requests being answered", value=self.load.requests)
        if self.drift is not None:
            yield from self._drift(self.drift)
        if self.outbox is not None:
            yield from self._outbox(self.outbox)

    @staticmethod
    def _drift(drift: DriftMonitor) -> Iterator[Metric]:
        flag = GaugeMetricFamily(
            "cnc_drift",
            "1: the alarm rate of the category's window is above its threshold's target",
            labels=["category"],
        )
        rate = GaugeMetricFamily(
            "cnc_drift_alarm_rate", "share of alarms in the category's window", labels=["category"]
        )
        target = GaugeMetricFamily(
            "cnc_drift_target_rate", "the false-alarm rate the category's threshold was set for", labels=["category"]
        )
        p_value = GaugeMetricFamily("cnc_drift_p_value", "binomial p-value of the window's alarms", labels=["category"])
        size = GaugeMetricFamily(
            "cnc_drift_window_decisions", "decisions in the category's window", labels=["category"]
        )
        for name, found in drift.snapshot().items():
            size.add_metric([name], found.decisions)
            if found.observed_rate is not None:
                rate.add_metric([name], found.observed_rate)
            if found.target_rate is not None and found.p_value is not None:
                target.add_metric([name], found.target_rate)
                p_value.add_metric([name], found.p_value)
                flag.add_metric([name], float(bool(found.drift)))
        yield from (flag, rate, target, p_value, size)

    @staticmethod
    def _outbox(outbox: Outbox) -> Iterator[Metric]:
        pending = GaugeMetricFamily("cnc_outbox_pending", "messages not yet taken", labels=["destination"])
        sent = CounterMetricFamily("cnc_outbox_sent", "messages taken since the start", labels=["destination"])
        failures = CounterMetricFamily("cnc_outbox_failures", "failed sends since the start", labels=["destination"])
        for found in outbox.stats()["destinations"]:
            pending.add_metric([found["destination"]], found["pending"])
            sent.add_metric([found["destination"]], found["sent"])
            failures.add_metric([found["destination"]], found["failures"])
        yield from (pending, sent, failures)


class MetricsMiddleware:
    """ASGI middleware (the outermost): counts every HTTP request with its route template, status, error code and
    time.

    Args:
        app: the application.
        metrics: where the counts go.
        routes: the application's routes (read when a request arrives, so routes added later count).
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def route_of(self, scope: Scope) -> str:
        """The template of the route that ``scope``'s path matches (also for another method), or ``other``."""
        for route in self.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return str(getattr(route, "path", OTHER_ROUTE))
        return OTHER_ROUTE

    async def __call__(self, scope: Scope, receive: Callable[[], Any], send: Callable[[Message], Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.route_of(scope)
        start = time.perf_counter()
        status, code, json_body = 500, None, False

        async def watched_send(message: Message) -> None:
            nonlocal status, code, json_body
            if message["type"] == "http.response.start":
                status = int(message["status"])
                content_type = dict(message.get("headers") or []).get(b"content-type", b"")
                json_body = content_type.startswith(b"application/json")
            elif message["type"] == "http.response.body" and status >= 400 and json_body and code is None:
                code = _error_code(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            if status >= 400 and code is None:
                code = "unknown"  # an error answer without a JSON error body
            self.metrics.observe_request(route, scope["method"], status, code, time.perf_counter() - start)


def _error_code(body: bytes) -> str:
    """The ``code`` of a JSON error body ``{"error": {"code": ...}}`` (``unknown`` for another body)."""
    try:
        code = json.loads(body[:_ERROR_BODY_BYTES])["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "unknown"
    return str(code)[:40]
