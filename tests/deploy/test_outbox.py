"""The outbox against real local receivers: one webhook POST per decision with its record, one MQTT message per
decision through a real broker (mosquitto), every message delivered after a receiver's or the broker's outage, what
was pending resent by a new outbox (a new object, a new process) and what was taken not resent, a torn last line, the
segments and the size cap."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnc_ad.deploy.decisions import DecisionLog, read_decisions
from cnc_ad.deploy.detector import ImageResult, ThresholdChoice
from cnc_ad.deploy.outbox import MqttTopic, Outbox, Webhook
from cnc_ad.errors import ConfigError
from tests.helpers import SUBPROCESS_ENV
from tests.receivers import Broker, Subscriber, WebhookReceiver, free_port, wait_for

CHOICE = ThresholdChoice(0.5, 0.5, "category", "false_alarm_rate=0.01", 100, "abcdef0123456789")
FAST = {"retry_min_s": 0.05, "retry_max_s": 0.5}  # retries within half a second, so the tests wait little


def _decide(log: DecisionLog, count: int, category: str | None = "pump") -> list[str]:
    """Record ``count`` decisions (alternately anomalous and ok); their ids."""
    ids = []
    for k in range(count):
        score = 0.9 if k % 2 == 0 else 0.1
        result = ImageResult(score, np.full((2, 2), score, np.float32), (8, 8), 0.5, 0.5)
        image = np.full((8, 8, 3), k, np.uint8)
        ids.append(log.record(result, CHOICE, name=f"part{k}.png", image=image, category=category).id)
    return ids


def _record(k: int) -> dict:
    return {"id": f"{k:032x}", "category": "pump", "verdict": "ok", "score": 0.1}


# ----------------------------------------------------------------------------------------------------- webhook
def test_a_webhook_receives_one_post_per_decision_with_its_record(tmp_path: Path) -> None:
    with WebhookReceiver() as receiver, DecisionLog(tmp_path / "log", source="serve", model="m") as log:
        outbox = Outbox(tmp_path / "outbox", [Webhook(receiver.url)], **FAST)
        outbox.follow(log)
        outbox.start()
        ids = _decide(log, 5)
        wait_for(lambda: len(receiver.posts) >= 5, what="five POSTs")
        outbox.close(drain_s=5)
    records = [d.to_json() for d in read_decisions(tmp_path / "log")]
    assert receiver.bodies() == records  # the records as logged, in log order, once each
    assert [p["headers"]["Idempotency-Key"] for p in receiver.posts] == ids
    assert {p["path"] for p in receiver.posts} == {"/hook"}
    assert {p["headers"]["Content-Type"] for p in receiver.posts} == {"application/json"}
    stats = outbox.stats()
    assert (stats["queued"], stats["pending"], stats["last_error"]) == (5, 0, None)
    assert stats["destinations"][0]["sent"] == 5 and stats["destinations"][0]["destination"] == receiver.url


def test_a_receiver_that_is_away_gets_every_message_once_back(tmp_path: Path) -> None:
    receiver = WebhookReceiver(status=503).start()  # up, but refusing
    try:
        with DecisionLog(tmp_path / "log", source="serve") as log:
            outbox = Outbox(tmp_path / "outbox", [Webhook(receiver.url)], **FAST)
            outbox.follow(log)
            outbox.start()
            ids = _decide(log, 3)
            wait_for(lambda: receiver.refused >= 2, what="refused posts")
            receiver.stop()  # and then away altogether
            ids += _decide(log, 3)
            wait_for(lambda: outbox.stats()["destinations"][0]["failures"] >= 4, what="failures")
            stats = outbox.stats()
            assert stats["pending"] == 6 and "message 1" in stats["last_error"]
            receiver.status = 200
            receiver.start()  # back, on the same port
            wait_for(lambda: outbox.pending == 0, what="the queue to empty")
            outbox.close()
    finally:
        receiver.stop()
    assert [b["id"] for b in receiver.bodies()] == ids


def test_a_new_outbox_over_the_folder_resends_what_was_pending(tmp_path: Path) -> None:
    receiver = WebhookReceiver()  # not started yet: nothing listens on its port
    first = Outbox(tmp_path / "outbox", [Webhook(receiver.url)], **FAST)
    first.start()
    for k in range(3):
        first.put(_record(k))
    wait_for(lambda: first.stats()["destinations"][0]["failures"] >= 1, what="a failure")
    first.close()
    assert first.pending == 3
    with receiver:
        again = Outbox(tmp_path / "outbox", [Webhook(receiver.url)], **FAST)
        assert again.pending == 3
        again.start()
        wait_for(lambda: len(receiver.posts) == 3, what="three POSTs")
        again.close()
        third = Outbox(tmp_path / "outbox", [Webhook(receiver.url)], **FAST)  # what was taken is not sent again
        assert third.pending == 0
        third.start()
        third.put(_record(3))
        wait_for(lambda: len(receiver.posts) == 4, what="the fourth POST")
        third.close(drain_s=5)
    assert [b["id"] for b in receiver.bodies()] == [_record(k)["id"] for k in range(4)]


def test_a_process_killed_with_messages_queued_leaves_them_for_the_next(tmp_path: Path) -> None:
    receiver = WebhookReceiver()
    script = f"""
import os
from cnc_ad.deploy.outbox import Outbox, Webhook
outbox = Outbox({str(tmp_path / "outbox")!r}, [Webhook({receiver.url!r})])
for k in range(4):
    outbox.put({{"id": f"{{k:032x}}", "verdict": "ok"}})
os._exit(9)  # no close: as killed
"""
    done = subprocess.run([sys.executable, "-c", script], env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    with receiver:
        outbox = Outbox(tmp_path / "outbox", [Webhook(receiver.url)], **FAST)
        outbox.start()
        wait_for(lambda: len(receiver.posts) == 4, what="four POSTs")
        outbox.close()
    assert [b["id"] for b in receiver.bodies()] == [f"{k:032x}" for k in range(4)]


def test_a_line_cut_short_by_a_power_loss_is_dropped_and_the_rest_sent(tmp_path: Path) -> None:
    receiver = WebhookReceiver()
    outbox = Outbox(tmp_path / "outbox", [Webhook(receiver.url)], **FAST)
    for k in range(2):
        outbox.put(_record(k))
    outbox.close()
    (segment,) = tmp_path.joinpath("outbox").glob("messages.*.jsonl")
    with open(segment, "ab") as handle:
        handle.write(b'{"seq": 3, "record": {"id": "cut')
    with receiver:
        outbox = Outbox(tmp_path / "outbox", [Webhook(receiver.url)], **FAST)
        assert outbox.put(_record(2)) == 3  # the torn line is cut off; the next takes its number
        outbox.start()
        wait_for(lambda: len(receiver.posts) == 3, what="three POSTs")
        outbox.close()
    assert [b["id"] for b in receiver.bodies()] == [_record(k)["id"] for k in range(3)]


def test_segments_every_destination_passed_are_removed(tmp_path: Path) -> None:
    with WebhookReceiver() as one, WebhookReceiver() as two:
        outbox = Outbox(tmp_path / "outbox", [Webhook(one.url), Webhook(two.url)], segment_bytes=300, **FAST)
        outbox.start()
        for k in range(12):
            outbox.put(_record(k))
        wait_for(lambda: outbox.pending == 0, what="the queue to empty")
        outbox.put(_record(12))  # the senders step into the newest segment, removing the ones behind
        wait_for(lambda: outbox.pending == 0, what="the queue to empty")
        wait_for(lambda: len(list(tmp_path.joinpath("outbox").glob("messages.*.jsonl"))) == 1, what="removals")
        outbox.close()
    for receiver in (one, two):
        assert [b["id"] for b in receiver.bodies()] == [_record(k)["id"] for k in range(13)]


def test_the_size_cap_removes_the_oldest_messages_and_says_so(tmp_path: Path, caplog) -> None:
    dead = f"http://127.0.0.1:{free_port()}/hook"
    outbox = Outbox(tmp_path / "outbox", [Webhook(dead)], max_bytes=1000, segment_bytes=300, **FAST)
    with caplog.at_level(logging.ERROR, logger="cnc_ad.deploy.outbox"):
        for k in range(20):
            outbox.put(_record(k))
    outbox.close()
    stored = sum(p.stat().st_size for p in tmp_path.joinpath("outbox").glob("messages.*.jsonl"))
    assert stored <= 1000 and outbox.stats()["dropped_segments"] > 0
    assert any("over its cap" in r.getMessage() and dead in r.getMessage() for r in caplog.records)


def test_a_destination_new_to_the_folder_starts_at_its_end(tmp_path: Path) -> None:
    with WebhookReceiver() as old, WebhookReceiver() as new:
        outbox = Outbox(tmp_path / "outbox", [Webhook(old.url)], **FAST)
        outbox.put(_record(0))
        outbox.close()
        outbox = Outbox(tmp_path / "outbox", [Webhook(old.url), Webhook(new.url)], **FAST)
        outbox.start()
        outbox.put(_record(1))
        wait_for(lambda: len(old.posts) == 2 and len(new.posts) == 1, what="the posts")
        outbox.close()
    assert [b["id"] for b in new.bodies()] == [_record(1)["id"]]


def test_bad_destinations_and_a_second_writer_are_refused(tmp_path: Path) -> None:
    for url in ("ftp://host/x", "http://", "not a url"):
        with pytest.raises(ConfigError, match="webhook"):
            Webhook(url)
    with pytest.raises(ConfigError, match="mqtt://"):
        MqttTopic("http://broker/topic")
    with pytest.raises(ConfigError, match="template"):
        MqttTopic("mqtt://broker/cnc/{line}/decision")
    with pytest.raises(ConfigError, match="at least one destination"):
        Outbox(tmp_path / "a", [])
    with pytest.raises(ConfigError, match="twice"):
        Outbox(tmp_path / "a", [Webhook("http://h/x"), Webhook("http://h/x")])
    with Outbox(tmp_path / "b", [Webhook("http://h/x")]), pytest.raises(ConfigError, match="in use"):
        Outbox(tmp_path / "b", [Webhook("http://h/x")])


def test_a_webhook_keeps_its_backlog_when_its_token_or_password_changes(tmp_path: Path) -> None:
    before = Webhook("http://user:old@h:8080/hook?token=a")
    after = Webhook("http://user:new@h:8080/hook?token=b")
    assert before.key == after.key  # the same cursor file: a rotated secret does not start at the queue's end
    assert "old" not in before.name and before.key != Webhook("http://h:8080/other").key
    with Outbox(tmp_path / "o", [before]) as outbox:
        outbox.put({"id": "1"})
    with Outbox(tmp_path / "o", [after]) as outbox:
        assert outbox.pending == 1  # still owed to the receiver, under its new token


def test_an_mqtt_topic_is_made_from_its_template() -> None:
    topic = MqttTopic("mqtt://user:secret@broker:1884/line4/{category}/{verdict}")
    assert (topic.host, topic.port, topic.username, topic.password) == ("broker", 1884, "user", "secret")
    assert "secret" not in topic.name
    assert topic.topic({"category": "pump", "verdict": "anomalous"}) == "line4/pump/anomalous"
    assert topic.topic({"category": "a/b+c#", "verdict": "ok"}) == "line4/a_b_c_/ok"  # no level or wildcard injected
    assert MqttTopic("mqtt://broker").topic({"category": None}) == "cnc/__all__/decision"


# -------------------------------------------------------------------------------------------------------- MQTT
def test_a_broker_receives_one_message_per_decision(tmp_path: Path) -> None:
    with Broker(tmp_path / "broker") as broker, DecisionLog(tmp_path / "log", source="serve") as log:
        subscriber = Subscriber(broker.port, "cnc/#")
        outbox = Outbox(tmp_path / "outbox", [MqttTopic(f"mqtt://127.0.0.1:{broker.port}")], **FAST)
        outbox.follow(log)
        outbox.start()
        ids = _decide(log, 3) + _decide(log, 1, category=None)
        wait_for(lambda: len(subscriber.messages) >= 4, what="four messages")
        outbox.close()
        subscriber.close()
    records = {d.id: d.to_json() for d in read_decisions(tmp_path / "log")}
    assert subscriber.ids() == ids
    assert [t for t, _ in subscriber.messages] == ["cnc/pump/decision"] * 3 + ["cnc/__all__/decision"]
    assert all(body == records[body["id"]] for _, body in subscriber.messages)


def test_decisions_made_while_the_broker_is_down_all_arrive_once_it_is_back(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker", persistent=True).start()
    try:
        with DecisionLog(tmp_path / "log", source="serve") as log:
            subscriber = Subscriber(broker.port, "cnc/#", persistent=True)
            outbox = Outbox(tmp_path / "outbox", [MqttTopic(f"mqtt://127.0.0.1:{broker.port}/cnc/{{category}}")],
                            **FAST)  # fmt: skip
            outbox.follow(log)
            outbox.start()
            ids = _decide(log, 3)
            wait_for(lambda: len(subscriber.messages) >= 3, what="the first three messages")
            broker.stop()
            ids += _decide(log, 4)  # while the broker is down: queued, retried
            wait_for(lambda: outbox.stats()["destinations"][0]["failures"] >= 2, what="failed sends")
            assert outbox.pending == 4
            broker.start()  # back on the same port
            wait_for(lambda: outbox.pending == 0, what="the queue to empty")
            wait_for(lambda: set(subscriber.ids()) >= set(ids), what="every message at the subscriber")
            outbox.close()
            subscriber.close()
    finally:
        broker.stop()
    arrived = subscriber.ids()
    assert set(arrived) == set(ids)  # every decision, perhaps one twice (at least once)
    assert arrived[:3] == ids[:3] and len(arrived) <= len(ids) + 1


def test_a_restarted_outbox_sends_what_the_broker_did_not_take(tmp_path: Path) -> None:
    port = free_port()
    first = Outbox(tmp_path / "outbox", [MqttTopic(f"mqtt://127.0.0.1:{port}")], **FAST)
    first.start()
    for k in range(3):
        first.put(_record(k))
    wait_for(lambda: first.stats()["destinations"][0]["failures"] >= 1, what="a failure")
    first.close()
    with Broker(tmp_path / "broker", port=port):
        subscriber = Subscriber(port, "cnc/#")
        again = Outbox(tmp_path / "outbox", [MqttTopic(f"mqtt://127.0.0.1:{port}")], **FAST)
        again.start()
        wait_for(lambda: len(subscriber.messages) == 3, what="three messages")
        again.close()
        subscriber.close()
    assert subscriber.ids() == [_record(k)["id"] for k in range(3)]
    assert json.loads(json.dumps(subscriber.messages[0][1])) == _record(0)
