"""Real local receivers of the outbox's signals, for the tests (``from tests.receivers import ...``): a webhook
receiver (an HTTP server in a thread) and an MQTT broker (Debian's mosquitto, started on a free port) with a
subscriber."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
        time.sleep(0.02)


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that records every POST (path, headers, JSON body) and answers ``status``.

    ``start()`` / ``stop()`` it; the port stays the same across restarts (a receiver that was away and is back).
    """

    def __init__(self, port: int | None = None, status: int = 200) -> None:
        self.port = port or free_port()
        self.status = status
        self.posts: list[dict[str, Any]] = []
        self.refused = 0
        self._server: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [post["body"] for post in self.posts]

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    if receiver.status < 300:
                        receiver.posts.append(
                            {"path": self.path, "headers": dict(self.headers), "body": json.loads(data)}
                        )
                    else:
                        receiver.refused += 1
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> WebhookReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def mosquitto_binary() -> str:
    """The broker's path; skips the test, loudly, where it is not installed."""
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.skip(
            "MOSQUITTO IS NOT INSTALLED: the MQTT outbox tests need a real broker (`apt-get install mosquitto`; "
            ".ci/run installs it)"
        )
    return found


class Broker:
    """mosquitto on 127.0.0.1 and a free port (the same one across :meth:`stop` and :meth:`start`), anonymous.

    ``persistent``: the broker keeps its subscribers' sessions (their subscriptions and queued QoS 1 messages) across
    a restart, in ``folder`` (mosquitto writes them when it stops).
    """

    def __init__(self, folder: Path, persistent: bool = False, port: int | None = None) -> None:
        self.binary = mosquitto_binary()
        self.port = port or free_port()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", f"persistence {str(persistent).lower()}"]
        if persistent:
            lines.append(f"persistence_location {folder}/")
        if os.geteuid() == 0:  # as root, mosquitto would switch to the user mosquitto, who cannot write into folder
            lines.append("user root")
        self.config = folder / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen | None = None

    def start(self) -> Broker:
        log = open(self.folder / "mosquitto.log", "ab")  # noqa: SIM115  # the broker writes it until it stops
        self.process = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def listening() -> bool:
            assert self.process is not None and self.process.poll() is None, (self.folder / "mosquitto.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_for(listening, 30, "mosquitto to listen")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()  # SIGTERM: a persistent broker writes its sessions
            self.process.wait(30)
            self.process = None

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Subscriber:
    """A paho client subscribed (QoS 1) to ``topic`` that records each message's topic and JSON payload.

    ``persistent``: a session the broker keeps while it is away (clean_session false, a fixed client id), so that
    messages published before it reconnects are kept for it; it reconnects by itself after the broker comes back.
    """

    def __init__(self, port: int, topic: str = "#", persistent: bool = False) -> None:
        from paho.mqtt import client as mqtt

        self.messages: list[tuple[str, dict[str, Any]]] = []
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"test-subscriber-{port}",
            clean_session=not persistent,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
            client.subscribe(topic, qos=1)

        def on_subscribe(*args: Any) -> None:
            self.subscribed.set()

        def on_message(client: Any, userdata: Any, message: Any) -> None:
            with self._lock:
                self.messages.append((message.topic, json.loads(message.payload)))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()
        assert self.subscribed.wait(30), "the test subscriber did not subscribe"

    def ids(self) -> list[str]:
        with self._lock:
            return [body["id"] for _, body in self.messages]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
