"""The outbox: every decision sent out as a signal, an HTTP webhook (a POST of the record as JSON) and/or an MQTT
message (QoS 1), from a durable queue on disk (the only module naming its files), so that an outage of a receiver or a
broker loses nothing.

An outbox is a folder::

    messages.<N>.jsonl     the queue: one JSON line per message {"seq": n, "record": {...}}, appended and fsynced;
                           N = 1, 2, ... (a larger N is newer); the newest takes new messages until it reaches the
                           segment size
    cursor-<key>.json      one per destination: how far it has acknowledged the queue {"destination", "segment",
                           "offset", "seq"} (written atomically); <key> is a digest of the destination
    .lock                  held by the one process that writes into the folder (its process id and host inside)

Delivery is at least once: a message is queued (fsynced) before the decision's answer leaves (the outbox follows the
decision log, whose subscribers run before :meth:`~cnc_ad.deploy.decisions.DecisionLog.record` returns); one sender
thread per destination sends the messages in queue order, and moves its cursor past a message only once the
destination took it (an HTTP 2xx answer; the broker's PUBACK). A failure is retried with exponential backoff (from
``retry_min_s`` to ``retry_max_s``) until it succeeds, so an outage delays messages and loses none; a restart over the
same folder resends from the cursor, so a message whose acknowledgement was lost to a crash is sent again: receivers
deduplicate by the record's ``id``. A destination that is new to the folder starts at its end (it is sent what is
queued from then on).

Segments that every configured destination has passed are removed; beyond ``max_bytes`` the oldest segment goes first,
sent or not (an error in the log says so): a receiver that is away for long loses its oldest messages rather than the
station its disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import SplitResult, urlsplit

from cnc_ad import __version__
from cnc_ad.deploy.decisions import Decision, DecisionLog, utc_now
from cnc_ad.errors import ConfigError, missing_extra
from cnc_ad.files import append_jsonl, atomic_write_json, fsync_path, hold_lock, repair_jsonl
from cnc_ad.thresholds import ALL

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_SEGMENT = re.compile(r"messages\.(\d+)\.jsonl")
_CURSOR = "cursor-{key}.json"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
"""The default cap on the queue's segments together (256 MiB: about 200,000 decisions)."""
_SEGMENT_BOUNDS = (64 * 1024, 16 * 1024 * 1024)  # the default segment size: max_bytes / 16 within these
_READ_BYTES = 256 * 1024  # what a sender reads of the queue at once
_IDLE_S = 1.0  # how often an idle sender lets its destination keep its connection alive
DEFAULT_TOPIC = "cnc/{category}/decision"
TOPIC_FIELDS = ("category", "verdict", "source", "model")
_TOPIC_UNSAFE = re.compile(r"[/+#\x00]")


class DeliveryError(Exception):
    """A destination did not take a message (it is retried)."""


# -------------------------------------------------------------------------------------------------- destinations
class Destination(Protocol):
    """Where messages go. ``name``: shown in statistics and logs (never a password); ``key``: names its cursor."""

    name: str
    key: str

    def send(self, record: Mapping[str, Any]) -> None:
        """Deliver one message (a decision record); return once the destination took it.

        Raises:
            DeliveryError, OSError: it did not (the message is sent again later).
        """

    def poll(self) -> None:
        """Called about every second while there is nothing to send (keep a connection alive)."""

    def close(self) -> None:
        """Release connections."""


def _key(kind: str, shown: str) -> str:
    return hashlib.sha256(f"{kind} {shown}".encode()).hexdigest()[:12]


def _without_password(parts: SplitResult) -> str:
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    user = f"{parts.username}@" if parts.username else ""
    port = f":{parts.port}" if parts.port else ""
    return parts._replace(netloc=f"{user}{host}{port}").geturl()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:  # a redirect is an answer other than 2xx
        return None


class Webhook:
    """POST each record as JSON to an HTTP(S) URL; any 2xx answer takes it.

    Headers: ``Content-Type: application/json``, ``Idempotency-Key`` (the decision's id, for deduplication),
    ``User-Agent: cnc-ad/<version>``. Redirects are not followed (an answer other than 2xx is a failure).

    Args:
        url: ``http://`` or ``https://`` URL.
        timeout_s: seconds to wait for the connection and the answer.

    Raises:
        ConfigError: not an HTTP(S) URL with a host.
    """

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  # raises on a bad port
        except ValueError as err:
            raise ConfigError(f"webhook {url!r} is not a URL ({err})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"webhook {url!r}: give an http:// or https:// URL with a host")
        self.url = url
        self.name = _without_password(parts)
        # The cursor's key leaves out the password and the query: a rotated token keeps the destination's backlog.
        self.key = _key("webhook", _without_password(parts._replace(query="", fragment="")))
        self.timeout_s = timeout_s
        self._opener = urllib.request.build_opener(_NoRedirects)

    def send(self, record: Mapping[str, Any]) -> None:
        request = urllib.request.Request(
            self.url,
            data=json.dumps(record).encode("utf-8"),
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Idempotency-Key": str(record.get("id", "")),
                "User-Agent": f"cnc-ad/{__version__}",
            },
        )
        try:
            with self._opener.open(request, timeout=self.timeout_s) as answer:
                answer.read()
        except urllib.error.HTTPError as err:
            err.close()
            raise DeliveryError(f"HTTP {err.code} {err.reason}") from None
        except urllib.error.URLError as err:
            raise DeliveryError(str(err.reason)) from None

    def poll(self) -> None:
        pass

    def close(self) -> None:
        pass


class MqttTopic:
    """Publish each record as JSON to an MQTT broker with QoS 1 (the broker's PUBACK takes it), on a topic made from a
    template: ``mqtt://[user[:password]@]host[:port]/TEMPLATE``, e.g. ``mqtt://broker:1883/cnc/{category}/decision``.

    The template may name the record's ``{category}`` (``__all__`` without one), ``{verdict}``, ``{source}`` and
    ``{model}``; characters MQTT reserves (``/ + #``) in them become ``_``. Without a path the topic is
    :data:`DEFAULT_TOPIC`. The client connects when it has something to send (MQTT 3.1.1, a clean session, keep-alive
    ``keepalive_s``) and again after a failure; it needs paho-mqtt (the ``mqtt`` extra).

    Args:
        url: the broker and topic template.
        timeout_s: seconds to wait for the connection and for each PUBACK.
        keepalive_s: the MQTT keep-alive interval in seconds.

    Raises:
        ConfigError: not an ``mqtt://`` URL with a host, or a template naming another field.
        MissingExtra: paho-mqtt is not installed.
    """

    def __init__(self, url: str, timeout_s: float = 10.0, keepalive_s: int = 30) -> None:
        try:
            parts = urlsplit(url)
            port = parts.port or 1883
        except ValueError as err:
            raise ConfigError(f"MQTT destination {url!r} is not a URL ({err})") from None
        if parts.scheme != "mqtt" or not parts.hostname:
            raise ConfigError(f"MQTT destination {url!r}: give mqtt://host[:port]/topic/template")
        self.template = parts.path.lstrip("/") or DEFAULT_TOPIC
        try:
            self.template.format(**dict.fromkeys(TOPIC_FIELDS, "x"))
        except (KeyError, IndexError, ValueError) as err:
            fields = ", ".join("{" + name + "}" for name in TOPIC_FIELDS)
            raise ConfigError(f"MQTT topic template {self.template!r} ({err}): it may name {fields}") from None
        try:
            from paho.mqtt import client as mqtt
        except ImportError as err:
            raise missing_extra("sending decisions over MQTT", err, "mqtt") from err
        self._mqtt = mqtt
        self.host, self.port = parts.hostname, port
        self.username, self.password = parts.username, parts.password
        self.name = _without_password(parts)
        self.key = _key("mqtt", _without_password(parts._replace(query="", fragment="")))
        self.timeout_s = timeout_s
        self.keepalive_s = keepalive_s
        self._client: Any = None

    def topic(self, record: Mapping[str, Any]) -> str:
        """The topic of one record (the template with its fields)."""
        values = {name: str(record.get(name) or "") for name in TOPIC_FIELDS}
        values["category"] = values["category"] or ALL
        return self.template.format(**{name: _TOPIC_UNSAFE.sub("_", value) for name, value in values.items()})

    def _connect(self) -> Any:
        mqtt = self._mqtt
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"cnc-ad-{uuid.uuid4().hex[:12]}", clean_session=True
        )
        if self.username:
            client.username_pw_set(self.username, self.password)
        answer: list[Any] = []
        client.on_connect = lambda _client, _data, _flags, reason, _properties: answer.append(reason)
        try:
            client.connect(self.host, self.port, keepalive=self.keepalive_s)
        except OSError as err:
            raise DeliveryError(f"cannot connect to the broker {self.host}:{self.port} ({err})") from None
        self._client = client
        self._loop_until(lambda: bool(answer), "the broker's answer to the connection")
        if answer[0].is_failure:
            self._drop()
            raise DeliveryError(f"the broker {self.host}:{self.port} refused the connection ({answer[0]})")
        return client

    def _loop_until(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not done():
            code = self._client.loop(0.05)
            if code != self._mqtt.MQTT_ERR_SUCCESS:
                self._drop()
                raise DeliveryError(f"lost the broker {self.host}:{self.port} ({self._mqtt.error_string(code)})")
            if time.monotonic() > deadline:
                self._drop()
                raise DeliveryError(f"no {what} from {self.host}:{self.port} within {self.timeout_s:g} s")

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.disconnect()

    def send(self, record: Mapping[str, Any]) -> None:
        client = self._client or self._connect()
        info = client.publish(self.topic(record), json.dumps(record).encode("utf-8"), qos=1)
        if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
            self._drop()
            raise DeliveryError(f"cannot publish to {self.host}:{self.port} ({self._mqtt.error_string(info.rc)})")
        self._loop_until(info.is_published, "acknowledgement (PUBACK)")

    def poll(self) -> None:
        if self._client is not None and self._client.loop(0) != self._mqtt.MQTT_ERR_SUCCESS:
            self._drop()  # connects again with the next message

    def close(self) -> None:
        self._drop()


# ------------------------------------------------------------------------------------------------------ queue
@dataclass
class _Cursor:
    segment: int
    offset: int
    seq: int


@dataclass
class _Sender:
    destination: Destination
    cursor: _Cursor
    sent: int = 0
    failures: int = 0
    failures_in_row: int = 0
    last_error: str | None = None
    last_error_time: str | None = None
    last_sent_time: str | None = None
    thread: threading.Thread | None = None


class Outbox:
    """A durable queue of messages and one sender thread per destination (see the module docstring).

    Open it, :meth:`follow` a decision log (or :meth:`put` records yourself), :meth:`start` the senders, and
    :meth:`close` it at the end (messages not yet sent stay queued for the next start over the same folder).

    Args:
        folder: the outbox's folder (created when missing).
        destinations: where every message goes (:class:`Webhook`, :class:`MqttTopic`, or any :class:`Destination`).
        max_bytes: the most bytes the queue's segments take; beyond it the oldest segment is removed, sent or not.
        segment_bytes: a segment's size, at which the next message starts a new one (default: ``max_bytes / 16``
            between 64 KiB and 16 MiB).
        retry_min_s, retry_max_s: the wait after a failed send: ``retry_min_s``, doubling with each failure in a row
            up to ``retry_max_s`` (seconds).

    Raises:
        ConfigError: no destinations, two alike, bad sizes or waits, or another process writes into ``folder``.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        destinations: Sequence[Destination],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        segment_bytes: int | None = None,
        retry_min_s: float = 0.5,
        retry_max_s: float = 30.0,
    ) -> None:
        if not destinations:
            raise ConfigError("an outbox needs at least one destination (a webhook URL or an MQTT broker)")
        if len({d.key for d in destinations}) < len(destinations):
            raise ConfigError(f"an outbox destination is given twice: {[d.name for d in destinations]}")
        if max_bytes < 1 or (segment_bytes is not None and segment_bytes < 1):
            raise ConfigError(f"outbox sizes must be >= 1 byte, got max_bytes={max_bytes}, segment={segment_bytes}")
        if not 0 < retry_min_s <= retry_max_s:
            raise ConfigError(
                f"outbox retry waits need 0 < retry_min_s <= retry_max_s, got {retry_min_s}, {retry_max_s}"
            )
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or int(min(max(max_bytes // 16, _SEGMENT_BOUNDS[0]), _SEGMENT_BOUNDS[1]))
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self._mutex = threading.Lock()
        self._changed = threading.Condition(self._mutex)
        self._stop = threading.Event()
        self._segments: dict[int, int] = {}  # number -> committed size (the newest: what senders may read)
        self._seq = 0
        self.dropped_segments = 0
        self.unqueued = 0
        self.last_error: str | None = None
        self._lock_fd: int | None = None
        self._senders: list[_Sender] = []
        self._open()
        try:
            self._senders = [_Sender(d, self._load_cursor(d)) for d in destinations]
        except BaseException:
            self._release()
            raise

    # -------------------------------------------------------------------------------------------------- opening
    def _open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, holder = hold_lock(self.folder / LOCK_FILE)
        if holder is not None:
            raise ConfigError(
                f"the outbox {self.folder} is in use by another writer ({holder}); stop it, or give another folder"
            )
        self._lock_fd = fd
        try:
            for entry in os.scandir(self.folder):
                match = _SEGMENT.fullmatch(entry.name)
                if match:
                    self._segments[int(match.group(1))] = 0
            if not self._segments:
                self._segments[1] = 0
            newest = max(self._segments)
            repair_jsonl(self._path(newest))  # a line cut short by a power loss would swallow the next one
            for number in self._segments:
                with contextlib.suppress(FileNotFoundError):
                    self._segments[number] = self._path(number).stat().st_size
            for number in sorted(self._segments, reverse=True):  # the last sequence number: the newest line
                seq = _last_seq(self._path(number))
                if seq is not None:
                    self._seq = seq
                    break
        except BaseException:
            self._release()
            raise

    def _path(self, number: int) -> Path:
        return self.folder / f"messages.{number}.jsonl"

    def _cursor_path(self, destination: Destination) -> Path:
        return self.folder / _CURSOR.format(key=destination.key)

    def _load_cursor(self, destination: Destination) -> _Cursor:
        """The destination's cursor; a destination new to the folder starts at its end (written at once, so that a
        crash before its first delivery loses nothing queued after this).
        """
        path = self._cursor_path(destination)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
            cursor = _Cursor(int(value["segment"]), int(value["offset"]), int(value["seq"]))
        except FileNotFoundError:
            newest = max(self._segments)
            cursor = _Cursor(newest, self._segments[newest], self._seq)
            self._save_cursor(destination, cursor)
            log.info("outbox %s: %s is new; it is sent what is queued from now on", self.folder, destination.name)
        except (OSError, ValueError, KeyError, TypeError) as err:
            oldest = min(self._segments)
            cursor = _Cursor(oldest, 0, 0)
            log.warning(
                "outbox %s: the cursor of %s is unreadable (%s): sending it the whole queue again",
                self.folder,
                destination.name,
                err,
            )
        return cursor

    def _save_cursor(self, destination: Destination, cursor: _Cursor) -> None:
        value = {"destination": destination.name, "segment": cursor.segment, "offset": cursor.offset, "seq": cursor.seq}
        atomic_write_json(self._cursor_path(destination), value)

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------------------------------------- queueing
    def put(self, record: Mapping[str, Any]) -> int:
        """Queue one message (a JSON object), durably: on disk when this returns. Returns its sequence number.

        Raises:
            OSError: it could not be written (a full or failing disk).
        """
        with self._mutex:
            newest = max(self._segments)
            started = self._segments[newest] >= self.segment_bytes
            if started:
                newest += 1
                self._segments[newest] = 0
            append_jsonl(self._path(newest), {"seq": self._seq + 1, "record": dict(record)})
            if started:
                fsync_path(self.folder)  # the new segment's name is durable too, not only its line
            self._seq += 1
            self._segments[newest] = self._path(newest).stat().st_size
            self._enforce_cap()
            self._changed.notify_all()
            return self._seq

    def follow(self, decisions: DecisionLog) -> Callable[[], None]:
        """Queue every decision the log records from now on (before its ``record`` returns); returns a function that
        stops following.
        """
        return decisions.subscribe(self._queue_decision)

    def _queue_decision(self, decision: Decision) -> None:
        try:
            self.put(decision.to_json())
        except OSError as err:  # the decision stands; its message is lost, and the statistics say so
            with self._mutex:
                self.unqueued += 1
                self.last_error = f"{utc_now()}: decision {decision.id} could not be queued: {err}"
            log.error(
                "outbox %s: decision %s could not be queued (%s): it will not be sent", self.folder, decision.id, err
            )

    def _enforce_cap(self) -> None:
        while sum(self._segments.values()) > self.max_bytes and len(self._segments) > 1:
            oldest = min(self._segments)
            behind = [s.destination.name for s in self._senders if s.cursor.segment <= oldest]
            self._path(oldest).unlink(missing_ok=True)
            del self._segments[oldest]
            self.dropped_segments += 1
            log.error(
                "outbox %s: removed %s (over its cap of %.0f MiB) with messages not yet sent to %s",
                self.folder,
                self._path(oldest).name,
                self.max_bytes / 2**20,
                ", ".join(behind) or "none",
            )

    # -------------------------------------------------------------------------------------------------- sending
    def start(self) -> None:
        """Start one sender thread per destination."""
        for sender in self._senders:
            if sender.thread is None:
                sender.thread = threading.Thread(
                    target=self._run, args=(sender,), name=f"outbox {sender.destination.name}", daemon=True
                )
                sender.thread.start()

    def _run(self, sender: _Sender) -> None:
        waiting: list[tuple[int, dict[str, Any], int]] = []  # (seq, record, offset after it) read ahead
        while not self._stop.is_set():
            if not waiting:
                try:
                    waiting = self._read(sender)
                    if not waiting:
                        sender.destination.poll()
                        continue
                except Exception as err:  # an unreadable queue file or a client's error: said, and tried again
                    self._failed(sender, f"cannot read the queue ({err or type(err).__name__})")
                    waiting = []
                    continue
            seq, record, end = waiting[0]
            try:
                sender.destination.send(record)
            except Exception as err:  # every failure is retried; the message stays queued
                self._failed(sender, f"message {seq}: {err or type(err).__name__}")
                continue
            waiting.pop(0)
            with self._changed:
                sender.cursor = _Cursor(sender.cursor.segment, end, seq)
                sender.sent += 1
                sender.failures_in_row = 0
                sender.last_sent_time = utc_now()
                self._changed.notify_all()
            try:
                self._save_cursor(sender.destination, sender.cursor)
            except OSError as err:  # the message may be sent again after a restart: at least once still holds
                log.error("outbox %s: cannot save the cursor of %s (%s)", self.folder, sender.destination.name, err)

    def _failed(self, sender: _Sender, error: str) -> None:
        """Count a failure, and wait before the next try (exponential backoff; a stop ends the wait)."""
        with self._changed:
            sender.failures += 1
            sender.failures_in_row += 1
            sender.last_error = error
            sender.last_error_time = utc_now()
            self.last_error = f"{sender.last_error_time}: {sender.destination.name}: {error}"
            self._changed.notify_all()
        delay = min(self.retry_max_s, self.retry_min_s * 2 ** min(sender.failures_in_row - 1, 30))
        log.warning("outbox: %s failed (%s); retrying in %.1f s", sender.destination.name, error, delay)
        self._stop.wait(delay)

    def _read(self, sender: _Sender) -> list[tuple[int, dict[str, Any], int]]:
        """The next messages after the sender's cursor (waits up to a second for new ones); moves the cursor to the
        next segment at the end of one.
        """
        with self._changed:
            cursor = sender.cursor
            if cursor.segment not in self._segments:  # removed by the cap: go on with the oldest left
                later = [n for n in self._segments if n > cursor.segment]
                if not later:  # cannot happen (the newest is never removed): start at the newest
                    later = [max(self._segments)]
                log.error(
                    "outbox %s: messages queued for %s were removed by the size cap",
                    self.folder,
                    sender.destination.name,
                )
                cursor = sender.cursor = _Cursor(min(later), 0, cursor.seq)
            size = self._segments[cursor.segment]
            if cursor.offset >= size:
                later = [n for n in self._segments if n > cursor.segment]
                if later:
                    sender.cursor = _Cursor(min(later), 0, cursor.seq)
                    self._remove_passed()
                    moved = sender.cursor
                else:
                    self._changed.wait(_IDLE_S)
                    return []
            else:
                moved = None
        if moved is not None:
            self._save_cursor(sender.destination, moved)
            return []
        path = self._path(cursor.segment)
        try:
            with open(path, "rb") as handle:  # committed bytes only: a line being appended lies beyond ``size``
                handle.seek(cursor.offset)
                chunk = handle.read(min(_READ_BYTES, size - cursor.offset))
                if b"\n" not in chunk:  # a line longer than that: the rest up to the committed end
                    chunk += handle.read(size - cursor.offset - len(chunk))
        except FileNotFoundError:  # removed by the size cap meanwhile
            return []
        found: list[tuple[int, dict[str, Any], int]] = []
        offset = cursor.offset
        for line in chunk.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # a line longer than what was read: read again from it
            offset += len(line)
            try:
                value = json.loads(line)
                found.append((int(value["seq"]), dict(value["record"]), offset))
            except (ValueError, KeyError, TypeError):
                log.warning("outbox %s: skipped an unreadable line of %s", self.folder, path.name)
        if not found and offset > cursor.offset:  # only unreadable lines: step past them
            with self._changed:
                sender.cursor = _Cursor(cursor.segment, offset, cursor.seq)
        elif not found:  # only part of a line (a write cut short): wait for more rather than spin
            with self._changed:
                self._changed.wait(_IDLE_S)
        return found

    def _remove_passed(self) -> None:
        """Remove the segments every destination has passed (never the newest). Called under the mutex."""
        first = min(s.cursor.segment for s in self._senders)
        for number in sorted(self._segments):
            if number >= first or number == max(self._segments):
                break
            self._path(number).unlink(missing_ok=True)
            del self._segments[number]
        fsync_path(self.folder)

    # ------------------------------------------------------------------------------------------------- reading
    @property
    def destinations(self) -> list[str]:
        """The destinations' names (their URLs without passwords)."""
        return [s.destination.name for s in self._senders]

    @property
    def pending(self) -> int:
        """Messages queued and not yet taken, summed over the destinations."""
        with self._mutex:
            return sum(self._seq - s.cursor.seq for s in self._senders)

    def stats(self) -> dict[str, Any]:
        """What ``GET /v1/stats`` shows under ``"outbox"``: ``pending`` (summed over the destinations), the latest
        error, and per destination its name, pending and sent messages, failures, latest error and times.
        """
        with self._mutex:
            destinations = [
                {
                    "destination": s.destination.name,
                    "pending": self._seq - s.cursor.seq,
                    "sent": s.sent,
                    "failures": s.failures,
                    "last_error": s.last_error,
                    "last_error_time": s.last_error_time,
                    "last_sent_time": s.last_sent_time,
                }
                for s in self._senders
            ]
            return {
                "folder": str(self.folder),
                "queued": self._seq,
                "pending": sum(d["pending"] for d in destinations),
                "last_error": self.last_error,
                "unqueued": self.unqueued,
                "dropped_segments": self.dropped_segments,
                "destinations": destinations,
            }

    # -------------------------------------------------------------------------------------------------- closing
    def close(self, drain_s: float = 0.0) -> None:
        """Stop the senders and release the folder; messages not yet taken stay queued for the next start.

        Args:
            drain_s: first wait up to this long for the queue to empty, while every destination takes messages (a
                destination that fails meanwhile is not waited for).
        """
        deadline = time.monotonic() + drain_s
        with self._changed:
            failures = {id(s): s.failures for s in self._senders}
            while any(s.thread is not None and self._seq > s.cursor.seq and s.failures == failures[id(s)]
                      for s in self._senders):  # fmt: skip
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        stuck = []
        for sender in self._senders:
            if sender.thread is not None:
                sender.thread.join(timeout=30)
                if sender.thread.is_alive():  # a send that outlasts the join: it may still move its cursor
                    stuck.append(sender.destination.name)
                    continue
                sender.thread = None
            sender.destination.close()
        left = self.pending
        if left:
            log.info("outbox %s: %d message(s) left to send at the next start", self.folder, left)
        if stuck:  # the folder stays locked by this process until it exits, so no other writer races the thread
            log.warning("outbox %s: still sending to %s; the folder stays locked until exit", self.folder,
                        ", ".join(stuck))  # fmt: skip
            return
        self._release()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _last_seq(path: Path) -> int | None:
    """The sequence number of a segment's last whole line, or None (empty, missing)."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - _READ_BYTES))
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        with contextlib.suppress(ValueError, KeyError, TypeError):
            return int(json.loads(line)["seq"])
    return None
