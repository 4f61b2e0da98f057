"""The FastAPI application: ``/v1/predict``, ``/v1/model``, ``/v1/health``, ``/v1/ready``, ``/v1/stats``, the line
loop's routes (``/v1/decisions``, ``/v1/feedback``, ``/v1/reload``: :mod:`cnc_ad.deploy.serve.loop`), Prometheus'
``/metrics`` (:mod:`cnc_ad.deploy.serve.metrics`) and the web page at ``/``.

Every request but the probes first passes :class:`~cnc_ad.deploy.serve.guard.RequestGuard` (host, origin, room, body
size, time). Every image of every request goes through :class:`~cnc_ad.deploy.serve.scoring.RequestScorer`: decoded in
a worker thread, queued to the :class:`~cnc_ad.deploy.serve.batcher.Batcher` (one model call for many concurrent
images), and rendered (statistics, PNGs) back in a worker thread. At start the scorer scores a synthetic image the same
way (the self-test behind ``/v1/ready``). Every refusal is a JSON error ``{"error": {"code": ..., "message": ...}}``
with a 4xx status (503 when the model failed or the server is overloaded: try again); errors never carry an internal
exception's text, only an id under which the server logged it. See ``docs/serve.md`` for the catalogue.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cnc_ad import __version__
from cnc_ad.deploy.decisions import DecisionLog
from cnc_ad.deploy.detector import Detector
from cnc_ad.deploy.drift import DriftMonitor
from cnc_ad.deploy.outbox import Outbox
from cnc_ad.deploy.serve.batcher import Batcher
from cnc_ad.deploy.serve.errors import APIError
from cnc_ad.deploy.serve.guard import DEADLINE, Load, RequestGuard
from cnc_ad.deploy.serve.loop import LineLoop
from cnc_ad.deploy.serve.memory import release_free_memory
from cnc_ad.deploy.serve.render import OUTPUTS, describe_thresholds
from cnc_ad.deploy.serve.scoring import RequestScorer
from cnc_ad.deploy.serve.settings import ServeSettings
from cnc_ad.errors import ConfigError, missing_extra

log = logging.getLogger(__name__)

FILES_FIELD = "files"
RAW_TYPES = ("image/", "application/octet-stream")
_MAX_FORM_FIELDS = 16
_MAX_FIELD_BYTES = 64 * 1024
PROBES = frozenset({"/v1/health", "/v1/ready"})  # never guarded: they must answer under load, to any Host


# ---------------------------------------------------------------------------------------------- model details
def describe_model(detector: Detector) -> dict[str, Any]:
    """What ``GET /v1/model`` tells about the model: preset, identity, sizes, categories, thresholds (with the rule and
    image count behind each, :func:`~cnc_ad.deploy.serve.render.describe_thresholds`), backend, tiling.
    """
    config = detector.config
    stored = detector.thresholds  # one snapshot: a reload may replace it
    tiling = detector.tiling
    return {
        "preset": config.get("preset"),
        "model_id": detector.model_id,
        "backend": detector.backend_name,
        "image_size": detector.image_size,
        "map_size": config.get("map_size"),
        "tiling": None if tiling is None else {"tile": tiling.tile, "overlap": tiling.overlap},
        "categories": stored.categories if stored is not None else [],
        **describe_thresholds(stored),
        "version": __version__,
    }


# ------------------------------------------------------------------------------------------------ parameters
def _parse_float(name: str, value: str | float | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise APIError(422, "invalid_parameter", f"{name} must be a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(number):
        raise APIError(422, "invalid_parameter", f"{name} must be a finite number, got {value!r}")
    return number


def _parse_outputs(value: str | None) -> frozenset[str]:
    names = frozenset(part.strip() for part in (value or "").split(",") if part.strip())
    unknown = sorted(names - set(OUTPUTS))
    if unknown:
        raise APIError(
            422, "invalid_parameter", f"return={','.join(unknown)[:60]} is unknown; use a comma list of {OUTPUTS}"
        )
    return names


def _form_text(form: Any, name: str) -> str | None:
    value = form.get(name)
    if value is None or isinstance(value, str):
        return value
    raise APIError(422, "invalid_parameter", f"form field {name!r} must be text, not a file")


async def _form_images(form: Any) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    uploads = form.getlist(FILES_FIELD)
    if not uploads:
        other = sorted({key for key, value in form.multi_items() if isinstance(value, UploadFile)})
        hint = f" (got files in {other})" if other else ""
        raise APIError(400, "no_images", f"no image in the multipart field {FILES_FIELD!r}{hint}; attach one")
    images = []
    for index, upload in enumerate(uploads):
        if not isinstance(upload, UploadFile):
            raise APIError(400, "no_images", f"the field {FILES_FIELD!r} must hold files, not text")
        images.append((upload.filename or f"file {index}", await upload.read()))
    fields = {
        name: text
        for name in ("category", "threshold", "pixel_threshold", "return")
        if (text := _form_text(form, name)) is not None
    }
    return images, fields


async def _read_images(request: Request, settings: ServeSettings) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """The uploaded files ``[(name, bytes)]`` and the text form fields of a multipart or raw-image request."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        try:
            async with request.form(
                max_files=settings.max_images, max_fields=_MAX_FORM_FIELDS, max_part_size=_MAX_FIELD_BYTES
            ) as form:  # closes the spooled upload files on the way out
                return await _form_images(form)
        except StarletteHTTPException as err:  # Starlette's multipart parser refused the body
            detail = str(err.detail)
            if detail.startswith("Too many files"):
                raise APIError(
                    413, "too_many_images", f"more than {settings.max_images} images in one request; split it"
                ) from None
            raise APIError(400, "malformed_request", f"the multipart body cannot be parsed ({detail})") from None
    if content_type.startswith(RAW_TYPES):
        return [("body", await request.body())], {}
    shown = content_type or "none"
    raise APIError(
        415,
        "unsupported_media_type",
        f"content type {shown[:60]!r} is not accepted; send multipart/form-data with files in {FILES_FIELD!r}, "
        "or one raw image with an image/* content type",
    )


# ---------------------------------------------------------------------------------------------------- errors
async def _api_error(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _invalid_parameter(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in err.errors())
    return await _api_error(request, APIError(422, "invalid_parameter", problems[:300]))


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    error = APIError(err.status_code, codes.get(err.status_code, f"http_{err.status_code}"), str(err.detail))
    return await _api_error(request, error)


async def _client_gone(request: Request, err: ClientDisconnect) -> JSONResponse:
    log.info("client %s disconnected during its upload", request.client.host if request.client else "?")
    return await _api_error(request, APIError(400, "client_disconnected", "the client closed the connection"))


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    """A bug: logged with its traceback under an id; the client gets the id, never the exception's text."""
    error_id = secrets.token_hex(4)
    log.error("unexpected error %s on %s %s", error_id, request.method, request.url.path, exc_info=err)
    message = f"an unexpected error occurred on the server; see the server log (id {error_id})"
    return JSONResponse({"error": {"code": "internal_error", "message": message}}, status_code=500)


def _add_error_handlers(app: FastAPI) -> None:
    handlers: list[tuple[type[Exception], Any]] = [
        (APIError, _api_error),
        (RequestValidationError, _invalid_parameter),
        (StarletteHTTPException, _http_error),
        (ClientDisconnect, _client_gone),
        (Exception, _internal_error),
    ]
    for error_class, handler in handlers:
        app.exception_handler(error_class)(handler)


# ----------------------------------------------------------------------------------------------- readiness
class Readiness:
    """Whether the server may take requests: its start-up self-test scored an image and the model worker runs."""

    def __init__(self, scorer: RequestScorer) -> None:
        self.scorer = scorer
        self.problem: str | None = "the start-up self-test has not run yet (the server is starting)"

    async def self_test(self, timeout_s: float) -> None:
        """Score a synthetic image through the path of every request; a failure is logged under an id."""
        try:
            score = await self.scorer.self_test(time.monotonic() + timeout_s)
        except Exception as err:  # the server stays up (alive, not ready) and says why in its log
            error_id = secrets.token_hex(4)
            log.error("the start-up self-test failed (id %s): %s", error_id, err, exc_info=err)
            self.problem = f"the model failed its start-up self-test; see the server log (id {error_id})"
            return
        log.info("start-up self-test passed (score %.4g)", score)
        self.problem = None

    def answer(self) -> JSONResponse:
        problem = self.problem
        if problem is None and not self.scorer.batcher.alive:
            problem = "the model worker is not running"
        if problem is not None:
            return JSONResponse({"status": "not_ready", "reason": problem}, status_code=503)
        return JSONResponse({"status": "ready"})


# ------------------------------------------------------------------------------------------------------ access
class TokenCheck:
    """A route dependency: 401 unless the request carries ``token`` (``Authorization: Bearer TOKEN``); None: open."""

    def __init__(self, token: str | None) -> None:
        self.token = token

    def __call__(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), self.token.encode()):
            raise APIError(
                401,
                "unauthorized",
                "this server needs its API token: send the header 'Authorization: Bearer TOKEN'",
                headers={"WWW-Authenticate": "Bearer"},
            )


PREDICT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": [FILES_FIELD],
                "properties": {
                    FILES_FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "category": {"type": "string"},
                    "threshold": {"type": "number"},
                    "pixel_threshold": {"type": "number"},
                    "return": {"type": "string"},
                },
            }
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
    },
}


# ------------------------------------------------------------------------------------------------------- app
def create_app(
    detector: Detector,
    settings: ServeSettings | None = None,
    decisions: DecisionLog | None = None,
    outbox: Outbox | None = None,
) -> FastAPI:
    """The HTTP application around ``detector``.

    The batcher's worker thread starts and stops with the application's lifespan (uvicorn runs it); at start, the
    lifespan scores a synthetic image (the self-test that ``/v1/ready`` reports) and begins following the decision log
    (the drift of each category, the decision counters of ``/metrics``), from the log's newest decisions.

    Args:
        detector: the model, with the thresholds it decides by (``POST /v1/reload`` re-reads them).
        settings: batching, limits, hosts and the API token (default: :class:`ServeSettings`'s defaults, no token).
        decisions: the decision log every decision is recorded in and corrections go to (the caller opens and closes
            it); None: no log (``/v1/decisions`` and ``/v1/feedback`` answer 404 ``no_decision_log``; no drift).
        outbox: the outbox that sends the log's decisions out (the caller opens, starts and closes it, and has it
            follow the log): its state is shown in ``/v1/stats`` and ``/metrics``.

    Returns:
        The FastAPI application; ``app.state.batcher`` holds the batcher (and its ``stats``), ``app.state.decisions``
        the decision log (subscribe to it there), ``app.state.drift`` the drift monitor (None without a log),
        ``app.state.outbox`` the outbox, ``app.state.metrics`` the Prometheus metrics.

    Raises:
        MissingExtra: prometheus-client (the ``serve`` extra) is not installed.
    """
    settings = settings or ServeSettings()
    try:
        from cnc_ad.deploy.serve.metrics import CONTENT_TYPE, MetricsMiddleware, ServerMetrics
    except ImportError as err:
        raise missing_extra("the server's /metrics", err, "serve") from err
    batcher = Batcher(
        detector.score,
        settings.max_batch_size,
        settings.max_wait_ms / 1000.0,
        settings.max_queue,
        release_memory=None if settings.release_memory_s is None else release_free_memory,
        release_every_s=settings.release_memory_s or 0.0,
    )
    page = resources.files("cnc_ad.deploy.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    load = Load(settings.max_requests, settings.max_decoding)
    scorer = RequestScorer(detector, batcher, settings, load, decisions)
    readiness = Readiness(scorer)
    drift = None if decisions is None else DriftMonitor(settings.drift_window, settings.drift_alpha)
    metrics = ServerMetrics(batcher, load, drift, outbox)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        await readiness.self_test(settings.request_timeout_s)
        log.info("model %s ready (%s)", describe_model(detector)["preset"], detector.source)
        following = []
        if decisions is not None and drift is not None:
            following = [drift.follow(decisions), decisions.subscribe(metrics.observe_decision)]
        try:
            yield
        finally:
            for stop in following:
                stop()
            batcher.stop()

    app = FastAPI(
        title="cnc-ad inference server",
        version=__version__,
        description="Anomaly scores, maps, masks and overlays from a trained CNC model. See docs/serve.md.",
        lifespan=lifespan,
        docs_url="/docs" if settings.api_docs else None,
        redoc_url="/redoc" if settings.api_docs else None,
    )
    app.state.batcher = batcher
    app.state.settings = settings
    app.state.detector = detector
    app.state.decisions = decisions
    app.state.drift = drift
    app.state.outbox = outbox
    app.state.metrics = metrics
    app.add_middleware(RequestGuard, settings=settings, load=load, open_paths=PROBES)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.router.routes)  # the outermost: counts refusals
    _add_error_handlers(app)
    authorized = [Depends(TokenCheck(settings.token))]
    app.include_router(LineLoop(detector, decisions).router(authorized))

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/v1/health", summary="Whether the server is alive and its model worker runs (no token needed)")
    async def health() -> JSONResponse:
        ok = batcher.alive
        body = {"status": "ok" if ok else "unavailable", "version": __version__, "auth": settings.token is not None}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/ready", summary="Whether the model passed its start-up self-test and takes requests (no token)")
    async def ready() -> JSONResponse:
        return readiness.answer()

    @app.get(
        "/v1/model", summary="The model: preset, categories and thresholds, sizes, limits", dependencies=authorized
    )
    async def model() -> dict[str, Any]:
        names = ("max_upload_bytes", "max_pixels", "max_request_pixels", "max_images", "max_batch_size")
        limits = {name: getattr(settings, name) for name in (*names, "max_requests", "request_timeout_s")}
        return {**describe_model(detector), "limits": limits}

    @app.get(
        "/v1/stats",
        summary="Batcher counters, the drift of each category's alarm rate, the outbox's state",
        dependencies=authorized,
    )
    async def stats() -> dict[str, Any]:
        return {
            **batcher.stats.as_dict(),
            "pending": batcher.pending,
            "requests": load.requests,
            "drift": None if drift is None else drift.to_json(),
            "outbox": None if outbox is None else outbox.stats(),
        }

    @app.get("/metrics", include_in_schema=False, dependencies=authorized)
    async def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    @app.post(
        "/v1/predict",
        summary="Score images: anomaly score, decision, map statistics, and on request map / mask / overlay PNGs",
        dependencies=authorized,
        openapi_extra={"requestBody": PREDICT_BODY},
    )
    async def predict(
        request: Request,
        category: str | None = Query(None, description="decide with this category's stored thresholds"),
        threshold: float | None = Query(None, description="image threshold (score >= threshold is anomalous)"),
        pixel_threshold: float | None = Query(None, description="mask threshold (map >= pixel_threshold)"),
        return_: str | None = Query(None, alias="return", description="comma list of map, mask, overlay (PNGs)"),
    ) -> dict[str, Any]:
        deadline = request.scope.get(DEADLINE, time.monotonic() + settings.request_timeout_s)
        images, fields = await _read_images(request, settings)
        if len(images) > settings.max_images:
            raise APIError(413, "too_many_images", f"more than {settings.max_images} images in one request; split it")
        category = (category if category is not None else fields.get("category")) or None
        threshold = _parse_float("threshold", threshold if threshold is not None else fields.get("threshold"))
        pixel_threshold = _parse_float(
            "pixel_threshold", pixel_threshold if pixel_threshold is not None else fields.get("pixel_threshold")
        )
        outputs = _parse_outputs(return_ if return_ is not None else fields.get("return"))
        try:
            chosen = detector.choose_thresholds(threshold, pixel_threshold, category)
        except ConfigError as err:
            raise APIError(422, "unknown_category", str(err)) from None
        results = await scorer.score(images, chosen, outputs, deadline, category=category)
        return {"category": category, "images": results}

    return app
