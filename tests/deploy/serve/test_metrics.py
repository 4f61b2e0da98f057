"""The server's signals through a real server: Prometheus' /metrics (parsed from the text format; a request moves its
counters), each category's drift in /v1/stats and on the page, the outbox's state; `cnc serve` and `cnc predict` send
their decisions to a local webhook receiver (and a restarted `cnc predict` sends what a receiver away missed)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx", reason="the serve tests need the test extra: pip install -e '.[test]'")
pytest.importorskip("uvicorn", reason="cnc serve needs the serve extra: pip install -e '.[serve]'")
parser = pytest.importorskip("prometheus_client.parser", reason="/metrics needs the serve extra")

from cnc_ad import Detector  # noqa: E402
from cnc_ad.deploy.decisions import DecisionLog, read_decisions  # noqa: E402
from cnc_ad.deploy.drift import binomial_tail  # noqa: E402
from cnc_ad.deploy.outbox import Outbox, Webhook  # noqa: E402
from cnc_ad.deploy.serve.app import create_app  # noqa: E402
from cnc_ad.deploy.serve.settings import ServeSettings  # noqa: E402
from tests.deploy.serve.test_app import chromium_page, running  # noqa: E402
from tests.deploy.serve.test_line_loop import AUTH, TOKEN, _line, _predict  # noqa: E402
from tests.helpers import run_cli, save_tiny_checkpoint  # noqa: E402
from tests.receivers import WebhookReceiver, free_port, wait_for  # noqa: E402


def scrape(url: str, headers: dict[str, str] = AUTH) -> dict[tuple[str, tuple], float]:
    """Every sample of ``/metrics``, parsed from Prometheus' text format: {(name, sorted labels): value}."""
    response = httpx.get(f"{url}/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in parser.text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_requests_errors_latency_decisions_drift_and_the_outbox(tmp_path: Path) -> None:
    checkpoint, alarmed, passed, _ = _line(tmp_path)  # thresholds set at false_alarm_rate=0.01
    detector = Detector.load(checkpoint, device="cpu")
    with WebhookReceiver() as receiver, DecisionLog(tmp_path / "log", source="serve") as log:
        outbox = Outbox(tmp_path / "outbox", [Webhook(receiver.url)], retry_min_s=0.05, retry_max_s=0.5)
        outbox.follow(log)
        outbox.start()
        settings = ServeSettings(token=TOKEN, drift_window=20)
        with running(create_app(detector, settings, log, outbox)) as url:
            before = scrape(url)
            ids = [_predict(url, part, category="brick")["id"] for part in (alarmed, alarmed, passed)]
            assert httpx.get(f"{url}/v1/model").status_code == 401  # no token
            assert httpx.get(f"{url}/nowhere", headers=AUTH).status_code == 404
            wait_for(lambda: len(receiver.posts) == 3, what="the three decisions at the receiver")
            after = scrape(url)
            stats = httpx.get(f"{url}/v1/stats", headers=AUTH).json()
            assert httpx.get(f"{url}/metrics").status_code == 401  # the token rules of /v1/
            assert httpx.get(f"{url}/metrics", headers={**AUTH, "Host": "evil.example"}).status_code == 403
        outbox.close()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("cnc_http_requests_total", route="/v1/predict", method="POST", status="200") == 3
    assert moved("cnc_http_request_duration_seconds_count", route="/v1/predict") == 3
    assert moved("cnc_http_request_duration_seconds_sum", route="/v1/predict") > 0
    assert moved("cnc_http_requests_total", route="/v1/model", method="GET", status="401") == 1
    assert moved("cnc_http_errors_total", route="/v1/model", code="unauthorized") == 1
    assert moved("cnc_http_errors_total", route="other", code="not_found") == 1
    assert moved("cnc_http_requests_total", route="/metrics", method="GET", status="200") == 1  # the first scrape
    assert value(after, "cnc_decisions_total", category="brick", verdict="anomalous") == 2
    assert value(after, "cnc_decisions_total", category="brick", verdict="ok") == 1
    assert value(after, "cnc_alarms_total", category="brick") == 2
    assert moved("cnc_images_scored_total") == 3 and value(after, "cnc_model_calls_total") >= 3
    # Drift: 2 alarms in 3 decisions against a 1 % target (p = 3e-4 < 0.001).
    assert value(after, "cnc_drift_window_decisions", category="brick") == 3
    assert value(after, "cnc_drift_alarm_rate", category="brick") == pytest.approx(2 / 3)
    assert value(after, "cnc_drift_target_rate", category="brick") == 0.01
    assert value(after, "cnc_drift_p_value", category="brick") == pytest.approx(binomial_tail(2, 3, 0.01))
    assert value(after, "cnc_drift", category="brick") == 1
    assert value(after, "cnc_outbox_sent_total", destination=receiver.url) == 3
    assert value(after, "cnc_outbox_pending", destination=receiver.url) == 0
    # /v1/stats: the same, as JSON; the receiver got each decision's record.
    brick = stats["drift"]["categories"]["brick"]
    assert (stats["drift"]["window"], stats["drift"]["alpha"]) == (20, 0.001)
    assert (brick["decisions"], brick["alarms"], brick["target_rate"], brick["drift"]) == (3, 2, 0.01, True)
    assert brick["rule"] == "false_alarm_rate=0.01;max+margin"
    assert stats["outbox"]["pending"] == 0 and stats["outbox"]["destinations"][0]["sent"] == 3
    assert [b["id"] for b in receiver.bodies()] == ids
    assert receiver.bodies() == [d.to_json() for d in read_decisions(tmp_path / "log")]


def test_a_server_without_a_log_has_no_drift_and_no_outbox(tmp_path: Path) -> None:
    detector = Detector.load(save_tiny_checkpoint(tmp_path / "ckpt"), device="cpu")
    with running(create_app(detector)) as url:
        stats = httpx.get(f"{url}/v1/stats").json()
        assert stats["drift"] is None and stats["outbox"] is None and stats["model_calls"] >= 1  # the self-test
        samples = scrape(url, headers={})  # no token set: open, as /v1/
        assert not any(name.startswith(("cnc_drift", "cnc_outbox")) for name, _ in samples)
        assert value(samples, "cnc_images_scored_total") >= 1


@pytest.mark.browser
def test_the_page_shows_each_categorys_alarms_and_drift_in_headless_chromium(tmp_path: Path) -> None:
    checkpoint, alarmed, passed, _ = _line(tmp_path)
    detector = Detector.load(checkpoint, device="cpu")
    with DecisionLog(tmp_path / "log", source="serve") as log:
        app = create_app(detector, ServeSettings(drift_window=50), log)
        with running(app) as url, chromium_page(tmp_path / "p") as page:
            for part in (alarmed, alarmed, passed):
                _predict(url, part, category="brick")
            _predict(url, passed)  # no category: the shared threshold's window
            page.call("Page.enable")
            page.call("Page.navigate", url=f"{url}/")
            page.wait_for("document.querySelector('#thresholds tr[data-category=brick] .drift .drift-flag') !== null")
            brick = page.evaluate("document.querySelector('#thresholds tr[data-category=brick] .drift').textContent")
            shared = page.evaluate("document.querySelector('#thresholds tr[data-category=__all__]').dataset.drift")
            head = page.evaluate("document.querySelector('#thresholds .drift-head').textContent")
    assert re.fullmatch(r"2 of 3 \(67 %\) · target 1\.0 % · p 0\.00030 DRIFT", brick), brick
    assert shared == "no" and head == "alarms (last 50)"


def test_cnc_serve_sends_its_decisions_to_a_webhook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    checkpoint, alarmed, _, _ = _line(tmp_path)
    served = []

    def serve(app, **kwargs) -> None:  # instead of serving: record one decision the way a request does
        detector = app.state.detector
        (outcome,) = detector.results([alarmed])
        app.state.decisions.record(outcome.result, detector.choose_thresholds(), name="p.png", image=alarmed)
        served.append(app)

    monkeypatch.setattr(uvicorn, "run", serve)
    base = ["serve", "--checkpoint", checkpoint, "--device", "cpu", "--decisions", tmp_path / "log"]
    with WebhookReceiver() as receiver:
        done = run_cli(*base, "--webhook", receiver.url, "--outbox", tmp_path / "outbox", "--drift-window", "7")
        assert done.code == 0, done.err
        (app,) = served
        assert app.state.drift.window == 7 and app.state.outbox.folder == tmp_path / "outbox"
        assert app.state.outbox.destinations == [receiver.url]
        assert f"decisions sent to {receiver.url}" in done.out
    (decision,) = read_decisions(tmp_path / "log")
    assert receiver.bodies() == [decision.to_json()]  # sent before the command ended
    refused = run_cli(*base[:5], "--no-decisions", "--webhook", receiver.url)
    assert refused.code == 2 and "--no-decisions" in refused.err and refused.err.count("\n") == 1


def test_cnc_predict_sends_at_its_next_run_what_a_receiver_away_missed(tmp_path: Path) -> None:
    checkpoint, alarmed, passed, _ = _line(tmp_path)
    receiver = WebhookReceiver(port=free_port())  # not listening yet
    argv = ["predict", "--model", checkpoint, "--device", "cpu", "--no-progress", "--decisions", tmp_path / "log",
            "--webhook", receiver.url, "--outbox", tmp_path / "outbox"]  # fmt: skip
    first = run_cli(*argv, alarmed, "--out", tmp_path / "out1")
    assert first.code == 0, first.err
    with receiver:
        second = run_cli(*argv, passed, "--out", tmp_path / "out2")
        assert second.code == 0, second.err
    assert [b["id"] for b in receiver.bodies()] == [d.id for d in read_decisions(tmp_path / "log")]
    assert [b["source"] for b in receiver.bodies()] == ["predict", "predict"]
    missing = run_cli("predict", "--model", checkpoint, alarmed, "--webhook", receiver.url, "--out", tmp_path / "o3")
    assert missing.code == 2 and "no --decisions DIR" in missing.err
    assert not (tmp_path / "o3").exists()  # refused before anything was scored


def test_missing_packages_name_their_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cnc_ad.errors import MissingExtra

    detector = Detector.load(save_tiny_checkpoint(tmp_path / "ckpt"), device="cpu")
    monkeypatch.delitem(sys.modules, "cnc_ad.deploy.serve.metrics", raising=False)
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # not installed
    with pytest.raises(MissingExtra, match=re.escape("pip install 'cnc-ad[serve]'")):
        create_app(detector)
    monkeypatch.undo()
    for name in ("paho", "paho.mqtt", "paho.mqtt.client"):  # also when an earlier test imported paho
        monkeypatch.setitem(sys.modules, name, None)
    done = run_cli("serve", "--checkpoint", tmp_path / "ckpt", "--device", "cpu", "--decisions", tmp_path / "log",
                   "--mqtt", "mqtt://127.0.0.1:1/cnc", "--outbox", tmp_path / "outbox")  # fmt: skip
    assert done.code == 2 and done.err.count("\n") == 1, done.err
    assert "pip install 'cnc-ad[mqtt]'" in done.err and "paho" in done.err
