"""Settings of the inference server: batching, limits and access (one frozen dataclass, validated on creation)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cnc_ad.deploy.drift import DEFAULT_ALPHA, DEFAULT_WINDOW
from cnc_ad.errors import ConfigError

TOKEN_ENV = "CNC_SERVE_TOKEN"
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


@dataclass(frozen=True)
class ServeSettings:
    """How the server batches, what it accepts and who may call it.

    Attributes:
        max_batch_size: images per model call, at most.
        max_wait_ms: how long the batcher waits, after the first image of a batch arrives, for more (milliseconds).
        max_queue: images waiting for the model, at most; more are refused with 503 (back-pressure).
        max_upload_bytes: largest request body in bytes (all images of a request together).
        max_pixels: largest image in pixels (width x height), read from the header before decoding.
        max_images: images in one request, at most.
        output_max_side: longest side in pixels of returned map / mask / overlay PNGs and of the map the statistics
            are computed on (smaller images keep their own size).
        max_requests: requests answered at once, at most (all routes but the probes ``/v1/health`` and ``/v1/ready``);
            more are refused with 503 ``busy`` as soon as their headers arrive, before their body is read.
        max_decoding: images of all requests together that are being decoded or wait, decoded, for the model, at most;
            a request whose images do not fit is refused with 503 ``busy`` (a POST arriving while none fit: before its
            body is read). At least ``max_images``.
        max_request_pixels: the pixels (width x height, read from the image headers before decoding) of all images of
            one request together, at most; more are refused with 413 ``too_many_pixels``.
        request_timeout_s: the longest a request may take from its headers to its answer (reading the body, decoding,
            the model, rendering), in seconds; later it is answered with 503 ``timeout``.
        release_memory_s: hand the memory that model calls freed back to the operating system (glibc's
            ``malloc_trim``; a no-op elsewhere) whenever the model worker falls idle, and under continuous load at most
            this often, in seconds; None: never. See :mod:`cnc_ad.deploy.serve.memory`.
        malloc_arenas: the most glibc malloc arenas the server's threads share (``mallopt(M_ARENA_MAX)``; a no-op
            off glibc, and where ``MALLOC_ARENA_MAX`` is set); None: glibc's default, 8 per core. ``cnc serve`` sets it
            before it loads the model (:func:`cnc_ad.deploy.serve.memory.limit_arenas`);
            :func:`~cnc_ad.deploy.serve.app.create_app` does not, since it only takes effect for threads that have not
            yet allocated.
        token: the API token (``Authorization: Bearer TOKEN``); None: no token needed.
        allowed_hosts: host names or addresses, besides loopback ones, that the ``Host`` header of a request may name
            and that a cross-origin POST may come from (its ``Origin``); ``"*"``: any (only with a token). Other
            requests are refused with 403, against DNS rebinding and cross-site form posts.
        api_docs: serve FastAPI's interactive API pages ``/docs`` and ``/redoc`` (they load their scripts from a CDN);
            ``/openapi.json`` is always served.
        drift_window: decisions per category over which the alarm rate is compared with the threshold's false-alarm
            rate (:mod:`cnc_ad.deploy.drift`; with a decision log).
        drift_alpha: drift is flagged when the binomial p-value of the window's alarms is below this.
    """

    max_batch_size: int = 16
    max_wait_ms: float = 5.0
    max_queue: int = 256
    max_upload_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_images: int = 32
    output_max_side: int = 1024
    max_requests: int = 64
    max_decoding: int = 64
    max_request_pixels: int = 100_000_000
    request_timeout_s: float = 60.0
    release_memory_s: float | None = 30.0
    malloc_arenas: int | None = 1
    token: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    api_docs: bool = False
    drift_window: int = DEFAULT_WINDOW
    drift_alpha: float = DEFAULT_ALPHA

    def __post_init__(self) -> None:
        positive = (
            "max_batch_size", "max_queue", "max_upload_bytes", "max_pixels", "max_images", "output_max_side",
            "max_requests", "max_decoding", "max_request_pixels", "drift_window",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"serve setting {name} must be >= 1, got {getattr(self, name)}")
        if self.max_decoding < self.max_images:
            raise ConfigError(
                f"serve setting max_decoding ({self.max_decoding}) must be at least max_images ({self.max_images}): "
                "a request of max_images images could never be decoded"
            )
        if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
            raise ConfigError("serve settings max_wait_ms must be >= 0 and request_timeout_s > 0")
        if not 0.0 < self.drift_alpha < 1.0:
            raise ConfigError(f"serve setting drift_alpha must be in (0, 1), got {self.drift_alpha}")
        if self.release_memory_s is not None and self.release_memory_s < 0:
            raise ConfigError(f"serve setting release_memory_s must be >= 0 or None, got {self.release_memory_s}")
        if self.malloc_arenas is not None and self.malloc_arenas < 1:
            raise ConfigError(f"serve setting malloc_arenas must be >= 1 or None, got {self.malloc_arenas}")
        if self.token is not None and not self.token.strip():
            raise ConfigError("the API token is empty; pass a non-empty token or none")
        object.__setattr__(self, "allowed_hosts", tuple(name.strip().lower() for name in self.allowed_hosts))
        if any(not name or "/" in name for name in self.allowed_hosts):
            raise ConfigError(f"allowed_hosts must be host names or addresses, got {list(self.allowed_hosts)}")
        if "*" in self.allowed_hosts and self.token is None:
            raise ConfigError(
                "allowed_hosts '*' admits any Host header, which exposes a server without a token to DNS rebinding: "
                "give it token=TOKEN too, or list the host names"
            )

    @property
    def connection_limit(self) -> int:
        """Open connections (idle keep-alive ones too) the HTTP server keeps at most: beyond, it answers 503 itself.

        Four per admitted request, so that refusals (503 ``busy``) and probes are still answered by the application.
        """
        return 4 * self.max_requests + 16


def is_loopback(host: str) -> bool:
    """Whether binding to ``host`` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bound_names(host: str) -> tuple[str, ...]:
    """Host names that requests to a server bound to ``host`` name besides loopback ones: ``host`` itself, unless it
    is loopback (always admitted) or a wildcard address (``0.0.0.0``, ``::``: list the names in ``allowed_hosts``).
    """
    name = host.strip("[]").lower()
    if is_loopback(name):
        return ()
    try:
        if ipaddress.ip_address(name).is_unspecified:
            return ()
    except ValueError:
        pass
    return (name,)


def check_access(host: str, token: str | None, insecure: bool) -> None:
    """Refuse to serve on a non-loopback address without a token, unless ``insecure`` is set explicitly.

    Raises:
        ConfigError: ``host`` is reachable from other machines and neither a token nor ``insecure`` is given.
    """
    if token is None and not insecure and not is_loopback(host):
        raise ConfigError(
            f"serving on {host} makes the model reachable from other machines; set an API token "
            f"({TOKEN_ENV}) or serve on 127.0.0.1, or accept an open server explicitly (insecure)"
        )
