"""The FastAPI application: ``/v1/predict``, ``/v1/model``, ``/v1/health``, ``/v1/stats`` and the web page at ``/``.

Every image of every request goes through :class:`~cnc_ad.deploy.serve.scoring.RequestScorer`: decoded in a worker
thread, queued to the :class:`~cnc_ad.deploy.serve.batcher.Batcher` (one model call for many concurrent images), and
rendered (statistics, PNGs) back in a worker thread. Every refusal
is a JSON error ``{"error": {"code": ..., "message": ...}}`` with a 4xx status (503 when the model failed or is
overloaded: try again); see ``docs/serve.md`` for the catalogue.
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cnc_ad import __version__
from cnc_ad.deploy.detector import Detector
from cnc_ad.deploy.serve.batcher import Batcher
from cnc_ad.deploy.serve.errors import APIError
from cnc_ad.deploy.serve.memory import release_free_memory
from cnc_ad.deploy.serve.render import OUTPUTS, json_float
from cnc_ad.deploy.serve.scoring import RequestScorer
from cnc_ad.deploy.serve.settings import ServeSettings
from cnc_ad.errors import ConfigError
from cnc_ad.thresholds import ALL

log = logging.getLogger(__name__)

FILES_FIELD = "files"
RAW_TYPES = ("image/", "application/octet-stream")
_MAX_FORM_FIELDS = 16
_MAX_FIELD_BYTES = 64 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


# ------------------------------------------------------------------------------------------------ body limit
class BodyLimit:
    """ASGI middleware: refuse a body larger than ``max_bytes`` (by its Content-Length, or while it streams in).

    A declared length over the limit is answered with 413 before the body is read; an undeclared (chunked) body
    raises :class:`APIError` from ``receive`` as soon as it passes the limit, which the route answers with 413.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> APIError:
        return APIError(
            413,
            "upload_too_large",
            f"the request body is {size} bytes, more than the server's limit of "
            f"{self.max_bytes}; send fewer or smaller images per request",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            error = self._too_large(declared.decode("latin-1"))
            await JSONResponse(error.body(), status_code=error.status, headers={"Connection": "close"})(
                scope, receive, send
            )
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large(f"more than {received}")
            return message

        await self.app(scope, limited_receive, send)


# ---------------------------------------------------------------------------------------------- model details
def describe_model(detector: Detector) -> dict[str, Any]:
    """What ``GET /v1/model`` tells about the model: preset, sizes, categories and thresholds, backend, tiling."""
    config = detector.config
    stored = detector.thresholds
    categories = stored.categories if stored is not None else []
    thresholds = None
    if stored is not None:  # NaN (a category without anomalies) is not JSON: null
        thresholds = {
            kind: {key: json_float(value) for key, value in stored.values(kind).items()} for kind in ("image", "pixel")
        }
    tiling = detector.tiling
    return {
        "preset": config.get("preset"),
        "backend": detector.backend_name,
        "image_size": detector.image_size,
        "map_size": config.get("map_size"),
        "tiling": None if tiling is None else {"tile": tiling.tile, "overlap": tiling.overlap},
        "categories": categories,
        "thresholds": thresholds,
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


# ------------------------------------------------------------------------------------------------------- app
def create_app(detector: Detector, settings: ServeSettings | None = None) -> FastAPI:
    """The HTTP application around ``detector``.

    The batcher's worker thread starts and stops with the application's lifespan (uvicorn runs it).

    Args:
        detector: the model, with the thresholds it decides by.
        settings: batching, limits and the API token (default: :class:`ServeSettings`'s defaults, no token).

    Returns:
        The FastAPI application; ``app.state.batcher`` holds the batcher (and its ``stats``).
    """
    settings = settings or ServeSettings()
    batcher = Batcher(
        detector.score,
        settings.max_batch_size,
        settings.max_wait_ms / 1000.0,
        settings.max_queue,
        release_memory=None if settings.release_memory_s is None else release_free_memory,
        release_every_s=settings.release_memory_s or 0.0,
    )
    page = resources.files("cnc_ad.deploy.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    scorer = RequestScorer(detector, batcher, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        log.info("model %s ready (%s)", describe_model(detector)["preset"], detector.source)
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(
        title="cnc-ad inference server",
        version=__version__,
        description="Anomaly scores, maps, masks and overlays from a trained CNC model. See docs/serve.md.",
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    app.state.settings = settings
    app.state.detector = detector
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes)

    # -------------------------------------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in err.errors())
        return await api_error(request, APIError(422, "invalid_parameter", problems[:300]))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        error = APIError(err.status_code, codes.get(err.status_code, f"http_{err.status_code}"), str(err.detail))
        return await api_error(request, error)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, err: ClientDisconnect) -> JSONResponse:
        log.info("client %s disconnected during its upload", request.client.host if request.client else "?")
        return await api_error(request, APIError(400, "client_disconnected", "the client closed the connection"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:  # a bug: logged with its traceback
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=err)
        return JSONResponse(
            {"error": {"code": "internal_error", "message": f"{type(err).__name__}: {err}"[:300]}}, status_code=500
        )

    def require_token(request: Request) -> None:
        if settings.token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), settings.token.encode()):
            raise APIError(
                401,
                "unauthorized",
                "this server needs its API token: send the header 'Authorization: Bearer TOKEN'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    authorized = [Depends(require_token)]

    # -------------------------------------------------------------------------------------------- routes
    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/v1/health", summary="Whether the model worker runs (no token needed)")
    async def health() -> JSONResponse:
        ok = batcher.alive
        body = {"status": "ok" if ok else "unavailable", "version": __version__, "auth": settings.token is not None}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get(
        "/v1/model", summary="The model: preset, categories and thresholds, sizes, limits", dependencies=authorized
    )
    async def model() -> dict[str, Any]:
        limits = {
            "max_upload_bytes": settings.max_upload_bytes,
            "max_pixels": settings.max_pixels,
            "max_images": settings.max_images,
            "max_batch_size": settings.max_batch_size,
        }
        return {**describe_model(detector), "limits": limits}

    @app.get("/v1/stats", summary="Batcher counters: model calls, images, mean batch size", dependencies=authorized)
    async def stats() -> dict[str, Any]:
        return {**batcher.stats.as_dict(), "pending": batcher.pending}

    @app.post(
        "/v1/predict",
        summary="Score images: anomaly score, decision, map statistics, and on request map / mask / overlay PNGs",
        dependencies=authorized,
        openapi_extra={
            "requestBody": {
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
                },
            }
        },
    )
    async def predict(
        request: Request,
        category: str | None = Query(None, description="decide with this category's stored thresholds"),
        threshold: float | None = Query(None, description="image threshold (score >= threshold is anomalous)"),
        pixel_threshold: float | None = Query(None, description="mask threshold (map >= pixel_threshold)"),
        return_: str | None = Query(None, alias="return", description="comma list of map, mask, overlay (PNGs)"),
    ) -> dict[str, Any]:
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
            image_t, pixel_t = detector.resolve_thresholds(threshold, pixel_threshold, category)
        except ConfigError as err:
            raise APIError(422, "unknown_category", str(err)) from None
        source = "request" if threshold is not None else None
        if source is None and image_t is not None:
            source = "category" if category is not None else ALL
        results = await scorer.score(images, image_t, pixel_t, outputs)
        for body in results:
            body["threshold"], body["threshold_source"] = json_float(image_t), source
        return {"category": category, "images": results}

    return app
