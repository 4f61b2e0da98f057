"""The request guard's checks on headers alone (Host, Origin, body size, room), without a server; test_app.py runs
them through a real uvicorn server."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette", reason="the server needs the serve extra: pip install -e '.[serve]'")

from starlette.datastructures import Headers

from cnc_ad.deploy.serve.guard import Load, RequestGuard, host_name
from cnc_ad.deploy.serve.settings import ServeSettings


def _guard(**settings) -> RequestGuard:
    async def app(scope, receive, send) -> None:
        raise AssertionError("not called")

    return RequestGuard(app, ServeSettings(**settings), Load(2, 32), frozenset({"/v1/health"}))


def _code(guard: RequestGuard, method: str = "GET", **headers: str) -> str | None:
    refusal = guard.refusal(method, Headers({name.replace("_", "-"): value for name, value in headers.items()}))
    return None if refusal is None else refusal.code


def test_host_names_from_host_headers():
    cases = {
        "localhost:8000": "localhost",
        "LOCALHOST": "localhost",
        "[::1]:8000": "::1",
        "[::1]": "::1",
        "127.0.0.1": "127.0.0.1",
        "line-pc.local.:80": "line-pc.local",
        "evil.example:8000": "evil.example",
        "[::1": "::1",
    }
    for header, name in cases.items():
        assert host_name(header) == name, header


def test_hosts_and_origins():
    guard = _guard()
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000", "127.0.0.9"):
        assert _code(guard, host=host) is None, host
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "0.0.0.0:8000", "[::]:80"):
        assert _code(guard, host=host) == "host_not_allowed", host
    assert _code(guard) is None  # no Host header (HTTP/1.0): no browser, no rebinding

    own = {"host": "127.0.0.1:8000"}
    assert _code(guard, "POST", **own, origin="http://127.0.0.1:8000") is None
    assert _code(guard, "POST", **own, origin="https://127.0.0.1:8000") is None  # behind a TLS proxy
    assert _code(guard, "GET", **own, origin="http://evil.example") is None  # reads are CORS's business
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9000", "file://", "http://[::1", "x"):
        for method in ("POST", "PUT", "DELETE"):
            assert _code(guard, method, **own, origin=origin) == "origin_not_allowed", (method, origin)

    named = _guard(allowed_hosts=("Line-PC.local",))
    assert _code(named, host="line-pc.local:8000") is None
    assert _code(named, "POST", host="127.0.0.1:8000", origin="http://line-pc.local:3000") is None
    assert _code(named, host="other.local") == "host_not_allowed"
    anything = _guard(token="s3cret", allowed_hosts=("*",))
    assert _code(anything, "POST", host="10.1.2.3:8000", origin="http://dashboard.example") is None


def test_body_size_and_room():
    guard = _guard(max_upload_bytes=1000)
    assert _code(guard, "POST", content_length="1000") is None
    assert _code(guard, "POST", content_length="1001") == "upload_too_large"
    assert _code(guard, "POST", content_length="-5") == "upload_too_large"

    load = guard.load
    assert load.admit() and load.admit() and not load.admit()  # two requests at most
    load.leave()
    assert load.admit()
    assert load.reserve(30) and not load.reserve(3) and load.reserve(2) and load.images_full
    assert _code(guard, "POST") == "busy" and _code(guard, "GET") is None  # a POST brings images
    load.release(32)
    assert _code(guard, "POST") is None
