"""What the server checks before a request reaches a route: whom it is addressed to, where it comes from, whether there
is room for it, how large its body is, and how long it may take.

:class:`RequestGuard` is an ASGI middleware around the application. For every HTTP request except the probes
(``/v1/health``, ``/v1/ready``), in this order:

1. **Host**: the ``Host`` header must name this machine (a loopback name or address) or one of
   ``ServeSettings.allowed_hosts``, else 403 ``host_not_allowed``. A web page whose DNS name an attacker points at
   127.0.0.1 (DNS rebinding) then cannot use the API from a browser on this machine.
2. **Origin**: a request that is not GET, HEAD or OPTIONS and has an ``Origin`` header must come from the server's own
   origin (the one its ``Host`` names) or an allowed host, else 403 ``origin_not_allowed``: another site's page cannot
   make a browser post to the server (a cross-site form post).
3. **Body size**: a declared ``Content-Length`` over ``max_upload_bytes`` is 413 ``upload_too_large``.
4. **Room**: at most ``max_requests`` requests at once, and a POST only while images can still be decoded
   (``max_decoding``), else 503 ``busy`` with ``Retry-After``.

All of these answer as soon as the headers are in, before the body is read (and close the connection, whose body is
left unread). Then, while the request runs, a chunked body is cut off with 413 as soon as it passes the body limit,
and ``request_timeout_s`` bounds the whole request from its headers to its answer (reading the body, decoding, the
model, rendering): past it, the route is cancelled and the answer is 503 ``timeout``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

import anyio
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from cnc_ad.deploy.serve.errors import APIError
from cnc_ad.deploy.serve.settings import ServeSettings, is_loopback

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEADLINE = "cnc_ad.deadline"  # scope key: the request's deadline on time.monotonic()'s clock
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
RETRY_AFTER_S = 1


class Load:
    """The requests and images the server is working on, against their limits.

    Counted on the event loop's thread only (the middleware and the routes), so no lock is needed.

    Args:
        max_requests: requests at once, at most.
        max_images: images being decoded or waiting, decoded, for the model, at most.
    """

    def __init__(self, max_requests: int, max_images: int) -> None:
        self.max_requests = max_requests
        self.max_images = max_images
        self.requests = 0
        self.images = 0

    def admit(self) -> bool:
        """Count one more request, if there is room for it."""
        if self.requests >= self.max_requests:
            return False
        self.requests += 1
        return True

    def leave(self) -> None:
        self.requests -= 1

    def reserve(self, images: int) -> bool:
        """Count ``images`` more images, if there is room for all of them."""
        if self.images + images > self.max_images:
            return False
        self.images += images
        return True

    def release(self, images: int) -> None:
        self.images -= images

    @property
    def images_full(self) -> bool:
        return self.images >= self.max_images


def busy(message: str) -> APIError:
    """503 ``busy``: the server has no room for the request now; retry after a second."""
    return APIError(503, "busy", f"{message}; retry shortly", {"Retry-After": str(RETRY_AFTER_S)})


def host_name(host: str) -> str:
    """The name or address of a ``Host`` header: ``example.org:8000`` -> ``example.org``, ``[::1]:80`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        host = host.split(":")[0]
    return host.rstrip(".")


async def send_error(error: APIError, scope: Scope, receive: Receive, send: Send, close: bool = False) -> None:
    """Answer with ``error``'s JSON body; ``close``: end the connection after it (the body was left unread)."""
    headers = {**(error.headers or {}), **({"Connection": "close"} if close else {})}
    await JSONResponse(error.body(), status_code=error.status, headers=headers)(scope, receive, send)


class RequestGuard:
    """ASGI middleware: the checks of this module's docstring, in that order, under ``settings``' limits.

    Args:
        app: the application it guards.
        settings: the limits and the allowed hosts.
        load: the count of requests and images, shared with the routes (they reserve the images).
        open_paths: paths that are never checked nor counted (the probes).
    """

    def __init__(self, app: ASGIApp, settings: ServeSettings, load: Load, open_paths: frozenset[str]) -> None:
        self.app = app
        self.settings = settings
        self.load = load
        self.open_paths = open_paths
        self.any_host = "*" in settings.allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope["method"], Headers(scope=scope))
        if refusal is None and not self.load.admit():
            refusal = busy(f"the server is answering its limit of {self.load.max_requests} requests at once")
        if refusal is not None:
            await send_error(refusal, scope, receive, send, close=True)
            return
        try:
            await self._run(scope, receive, send)
        finally:
            self.load.leave()

    # ------------------------------------------------------------------------------------------------ checks
    def allowed(self, name: str) -> bool:
        """Whether ``name`` (a host name or address) is one the settings allow besides loopback ones."""
        return self.any_host or name in self.settings.allowed_hosts

    def refusal(self, method: str, headers: Headers) -> APIError | None:
        """Why a request with these headers is refused before its body is read; None: it is not (room aside)."""
        for host in headers.getlist("host"):
            name = host_name(host)
            if not (is_loopback(name) or self.allowed(name)):
                return APIError(
                    403,
                    "host_not_allowed",
                    f"this server does not answer to the host name {name[:80]!r}: connect to it by a name it is "
                    "configured for (its operator lists them in the server's allowed hosts)",
                )
        origin = headers.get("origin")
        if method not in SAFE_METHODS and origin is not None and not self.same_site(origin, headers.get("host", "")):
            return APIError(
                403,
                "origin_not_allowed",
                f"a {method} from a page of {origin[:80]!r} is refused: this server takes such requests from its own "
                "page, from clients that send no Origin header, and from the hosts its operator allows",
            )
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.settings.max_upload_bytes):
            return self.too_large(declared[:20])
        if method == "POST" and self.load.images_full:
            return busy(f"the server is decoding its limit of {self.load.max_images} images")
        return None

    def same_site(self, origin: str, host: str) -> bool:
        """Whether a request from ``origin`` (an ``Origin`` header) to ``host`` (its ``Host`` header) may change
        things: the server's own origin, or an allowed host.
        """
        try:
            parts = urlsplit(origin.strip())
            name = (parts.hostname or "").rstrip(".")
        except ValueError:  # a malformed origin (an unclosed IPv6 bracket)
            return False
        if parts.scheme not in ("http", "https") or not name:
            return False  # "null" (a sandboxed or file: page) and the like
        return parts.netloc.lower() == host.strip().lower() or self.allowed(name)

    def too_large(self, size: str) -> APIError:
        return APIError(
            413,
            "upload_too_large",
            f"the request body is {size} bytes, more than the server's limit of {self.settings.max_upload_bytes}; "
            "send fewer or smaller images per request",
        )

    # ------------------------------------------------------------------------------------------------ running
    async def _run(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the application on the request with the body limit and the deadline."""
        timeout = self.settings.request_timeout_s
        scope[DEADLINE] = time.monotonic() + timeout
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.settings.max_upload_bytes:
                    raise self.too_large(f"more than {received}")  # answered by the route's error handler
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        with anyio.move_on_after(timeout) as deadline:
            await self.app(scope, limited_receive, watched_send)
        if deadline.cancelled_caught:
            log.warning("%s %s took longer than %g s: cancelled", scope["method"], scope["path"], timeout)
            if not started:
                error = APIError(
                    503, "timeout", f"the request took longer than the server's limit of {timeout:g} s; retry later"
                )
                await send_error(error, scope, receive, send, close=True)
