"""``cnc serve``: an HTTP inference server (FastAPI + uvicorn) with batching, limits, an API token and a web page."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType

from cnc_ad.cli._options import (
    OUTBOX_DRAIN_S,
    add_decision_log,
    add_device,
    add_model,
    add_outbox,
    add_tiling,
    add_weights,
    check_outbox,
    load_detector,
    open_decision_log,
    open_outbox,
)
from cnc_ad.errors import ConfigError, missing_extra

EPILOG = """\
examples:
  cnc serve --model runs/line                      # http://127.0.0.1:8000/ (page), /openapi.json (API)
  cnc serve --model model.xml --port 9000          # OpenVINO on a station without torch; model.onnx: ONNX Runtime
  cnc serve --model runs/pcb --tile 512 --thresholds tiled.json   # large scans scored by tiles
  CNC_SERVE_TOKEN=s3cret cnc serve --model runs/line --host 0.0.0.0 --allow-host line-pc.local

API (docs/serve.md has the details; /openapi.json the schema; --api-docs adds the /docs page, which loads from a CDN):
  POST /v1/predict   images as multipart field `files` (several) or one raw image body (Content-Type image/*);
                     ?category=C  ?threshold=T  ?pixel_threshold=P  ?return=map,mask,overlay (base64 PNGs)
                     -> {"images": [{"name", "score", "is_anomalous", "threshold", "threshold_source",
                                     "pixel_threshold", "width", "height", "map_stats", ...}]}
  GET  /v1/model     preset, backend, categories and thresholds, image size, tiling, limits, version
  GET  /v1/health    {"status": "ok"} while the server is alive (never needs the token)
  GET  /v1/ready     {"status": "ready"} once the model scored a start-up self-test image; 503 before or if it failed
  GET  /v1/stats     model calls, images, mean batch size; each category's alarm rate and drift; the outbox
  GET  /metrics      Prometheus metrics (requests, errors, latency, decisions, alarms, drift, outbox); token as /v1/
  GET  /v1/decisions ?limit=20 the newest decisions with their corrections; /v1/decisions/ID/overlay (and /image)
  POST /v1/feedback  {"id": decision id, "label": "good" | "defect", "note": "..."}: an operator's correction
  POST /v1/reload    re-read the thresholds from their file (after `cnc calibrate`), no restart

security: on any address other than loopback (127.0.0.1, ::1, localhost) the server needs an API token
(--token or CNC_SERVE_TOKEN; clients send `Authorization: Bearer TOKEN`), unless you pass --insecure. With a token
every /v1/ route but the probes answers 401 without it. Use a TLS-terminating proxy for traffic between machines.
Requests must name the server by a loopback name or address, by its --host address, or by a --allow-host NAME
(else 403: DNS rebinding); a POST from another site's page (an Origin header) is refused. --allow-host '*' admits any
name, with a token only.

limits: --max-requests (64) requests at once and --max-decoding (64) images held are checked before a body is read
(503 busy); --request-timeout (60 s) bounds a whole request (503 timeout); SIGTERM lets the requests in flight finish.

thresholds: the ones stored for the model (beside a checkpoint or an exported file, else embedded at export; see
`cnc predict --help`); --thresholds FILE overrides them; a request's ?threshold wins, ?category picks that category's.
POST /v1/reload re-reads that file (the one beside the model, or --thresholds FILE).

decisions (the line loop): every decision is appended to the decision log --decisions DIR (default ./decisions; one
fsynced JSON line each: id, time, model, category, score, threshold with its rule and image count, verdict, image
digest), before the answer leaves. --keep anomalous (default) keeps the image and heatmap of each anomalous part in
DIR (all: every part; none: no images), within --log-max-mb (1024; the oldest images, then the oldest log segments go
first). Operators correct decisions on the page (or POST /v1/feedback); `cnc calibrate --from-feedback DIR` sets the
thresholds again from the parts confirmed good, and POST /v1/reload puts them to work. `cnc decisions DIR` lists them.
--no-decisions records nothing.

drift: per category, the alarms among the last --drift-window (200) decisions against the false-alarm rate its
threshold was set for (false_alarm_rate=R); drift when a one-sided binomial test gives p < --drift-alpha (0.001).
Shown in /v1/stats, /metrics and on the page.

signals out: --webhook URL (POST of each decision's record as JSON) and --mqtt mqtt://host:1883/cnc/{category}/decision
(QoS 1; the mqtt extra), each repeatable, are sent from a durable queue in --outbox DIR (default ./outbox) with
retries: an outage of a receiver or the broker delays messages, a restart resends what was not acknowledged (at least
once: receivers deduplicate by the record's id). /v1/stats shows what is pending and the last error.

--tile PX [--tile-overlap SHARE]: score every uploaded image by tiles at its own resolution, as `cnc predict --tile`
does (the tiles of concurrent requests share the model calls); give thresholds set with the same tiles.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="HTTP inference server with request batching and a web page",
        description="Serve a trained model over HTTP: a JSON API with request batching, and a web page at /.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    parser.add_argument("--token", help="API token clients must send (default: $CNC_SERVE_TOKEN, if set)")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without a token")
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or address clients may use besides loopback ones and --host (repeatable; '*': any, with a "
        "token only)",
    )
    parser.add_argument(
        "--api-docs", action="store_true", help="serve the interactive API pages /docs and /redoc (loaded from a CDN)"
    )
    parser.add_argument("--thresholds", metavar="FILE", help="a thresholds.json to use (default: the stored one)")
    add_decision_log(parser, default="decisions", keep="anomalous")
    parser.add_argument(
        "--drift-window", type=int, default=200, metavar="N", help="decisions per category the alarm rate is tested on"
    )
    parser.add_argument(
        "--drift-alpha", type=float, default=0.001, help="flag drift when the alarms' p-value is below this (0.001)"
    )
    add_outbox(parser)
    add_device(parser, default="auto", note="checkpoints; OpenVINO: its device name")
    add_tiling(parser)
    parser.add_argument("--max-batch-size", type=int, default=16, help="images per model call (default 16)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="wait for a batch to fill (default 5 ms)")
    parser.add_argument("--max-queue", type=int, default=256, help="images waiting before 503 busy (default 256)")
    parser.add_argument("--max-upload-mb", type=float, default=32.0, help="largest request body in MiB (default 32)")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image in pixels (default 40M)")
    parser.add_argument("--max-images", type=int, default=32, help="images per request (default 32)")
    parser.add_argument(
        "--max-request-pixels", type=int, default=100_000_000, help="pixels of all images of a request (100M)"
    )
    parser.add_argument("--max-requests", type=int, default=64, help="requests answered at once (default 64)")
    parser.add_argument("--max-decoding", type=int, default=64, help="images decoded or held at once (default 64)")
    parser.add_argument("--output-max-side", type=int, default=1024, help="longest side of returned PNGs (1024)")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="longest a request may take (60 s)")
    add_weights(parser)
    parser.add_argument(
        "--malloc-arenas",
        type=int,
        default=1,
        help="glibc malloc arenas the server's threads share (default 1: its memory stays level; 0: glibc's default)",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cnc_ad.deploy.serve.settings import TOKEN_ENV, ServeSettings, bound_names, check_access, is_loopback

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    try:
        check_access(args.host, token, args.insecure)
    except ConfigError as err:
        raise ConfigError(f"{err}: pass --token, or --host 127.0.0.1, or --insecure") from None
    check_outbox(args)
    try:
        import uvicorn

        from cnc_ad.deploy.serve.app import create_app
        from cnc_ad.deploy.serve.memory import limit_arenas
    except ImportError as err:
        raise missing_extra("cnc serve", err, "serve") from err
    settings = ServeSettings(
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
        max_images=args.max_images,
        max_request_pixels=args.max_request_pixels,
        max_requests=args.max_requests,
        max_decoding=args.max_decoding,
        output_max_side=args.output_max_side,
        request_timeout_s=args.request_timeout,
        token=token,
        allowed_hosts=(*bound_names(args.host), *args.allow_host),
        api_docs=args.api_docs,
        malloc_arenas=args.malloc_arenas or None,
        drift_window=args.drift_window,
        drift_alpha=args.drift_alpha,
    )
    limit_arenas(settings.malloc_arenas)  # before the model is loaded and the server's threads start
    detector = load_detector(args)
    decisions = open_decision_log(args, detector, "serve")
    outbox = None
    try:
        outbox = open_outbox(args, decisions)
        app = create_app(detector, settings, decisions, outbox)
        host = f"[{args.host}]" if ":" in args.host else args.host
        open_to = "open to this machine" if is_loopback(args.host) else "OPEN (--insecure)"
        access = "token required" if token else open_to
        engine = f"{detector.backend_name}" + (f", {detector.tiling.describe()}" if detector.tiling else "")
        names = ", ".join(["loopback", *settings.allowed_hosts])
        print(f"cnc serve: {detector.source} ({engine}) on http://{host}:{args.port}/ ({access}; host names: {names}); "
              f"API schema at /openapi.json", flush=True)  # fmt: skip
        if decisions is not None:
            print(f"cnc serve: decisions logged in {decisions.folder} (keep {decisions.keep}, at most "
                  f"{decisions.max_bytes / 2**20:g} MiB)", flush=True)  # fmt: skip
        if outbox is not None:
            print(f"cnc serve: decisions sent to {', '.join(outbox.destinations)} from the outbox {outbox.folder} "
                  f"({outbox.pending} pending)", flush=True)  # fmt: skip
        with _sigterm_drains():
            uvicorn.run(
                app,
                host=args.host,
                port=args.port,
                log_level=args.log_level,
                limit_concurrency=settings.connection_limit,
                timeout_graceful_shutdown=math.ceil(settings.request_timeout_s) + 1,  # every request ends by then
            )
    finally:
        if outbox is not None:
            outbox.close(drain_s=OUTBOX_DRAIN_S)
        if decisions is not None:
            decisions.close()
    return 0


@contextlib.contextmanager
def _sigterm_drains() -> Iterator[None]:
    """Let SIGTERM end the server with exit code 0 once the requests in flight are answered.

    uvicorn handles SIGTERM itself (it stops accepting connections, waits for the requests in flight for up to its
    graceful-shutdown timeout, then runs the lifespan's shutdown); afterwards it raises the signal again for the
    handler that was installed before it ran. That handler is this one, so the process ends normally instead of
    being killed by the default action.
    """

    def drained(signum: int, frame: FrameType | None) -> None:
        print("cnc serve: stopped by SIGTERM after answering the requests in flight", file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, drained)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
