"""``cnc serve``: an HTTP inference server (FastAPI + uvicorn) with batching, limits, an API token and a web page."""

from __future__ import annotations

import argparse
import os

from cnc_ad.cli._options import add_device, add_model, add_tiling, add_weights, load_detector
from cnc_ad.errors import ConfigError, missing_extra

EPILOG = """\
examples:
  cnc serve --model runs/line                      # http://127.0.0.1:8000/ (page), /docs (API)
  cnc serve --model model.xml --port 9000          # OpenVINO on a station without torch; model.onnx: ONNX Runtime
  cnc serve --model runs/pcb --tile 512 --thresholds tiled.json   # large scans scored by tiles
  CNC_SERVE_TOKEN=s3cret cnc serve --model runs/line --host 0.0.0.0

API (docs/serve.md has the details; /docs has the OpenAPI page):
  POST /v1/predict   images as multipart field `files` (several) or one raw image body (Content-Type image/*);
                     ?category=C  ?threshold=T  ?pixel_threshold=P  ?return=map,mask,overlay (base64 PNGs)
                     -> {"images": [{"name", "score", "is_anomalous", "threshold", "threshold_source",
                                     "pixel_threshold", "width", "height", "map_stats", ...}]}
  GET  /v1/model     preset, backend, categories and thresholds, image size, tiling, limits, version
  GET  /v1/health    {"status": "ok"} (never needs the token)
  GET  /v1/stats     model calls, images, mean batch size

security: on any address other than loopback (127.0.0.1, ::1, localhost) the server needs an API token
(--token or CNC_SERVE_TOKEN; clients send `Authorization: Bearer TOKEN`), unless you pass --insecure. With a token
every /v1/ route but /v1/health answers 401 without it. Use a TLS-terminating proxy for traffic between machines.

thresholds: the ones stored for the model (beside a checkpoint or an exported file, else embedded at export; see
`cnc predict --help`); --thresholds FILE overrides them; a request's ?threshold wins, ?category picks that category's.

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
    parser.add_argument("--thresholds", metavar="FILE", help="a thresholds.json to use (default: the stored one)")
    add_device(parser, default="auto", note="checkpoints; OpenVINO: its device name")
    add_tiling(parser)
    parser.add_argument("--max-batch-size", type=int, default=16, help="images per model call (default 16)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="wait for a batch to fill (default 5 ms)")
    parser.add_argument("--max-queue", type=int, default=256, help="images waiting before 503 busy (default 256)")
    parser.add_argument("--max-upload-mb", type=float, default=32.0, help="largest request body in MiB (default 32)")
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image in pixels (default 40M)")
    parser.add_argument("--max-images", type=int, default=32, help="images per request (default 32)")
    parser.add_argument("--output-max-side", type=int, default=1024, help="longest side of returned PNGs (1024)")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="503 when no result within (60 s)")
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
    from cnc_ad.deploy.serve.settings import TOKEN_ENV, ServeSettings, check_access, is_loopback

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    try:
        check_access(args.host, token, args.insecure)
    except ConfigError as err:
        raise ConfigError(f"{err}: pass --token, or --host 127.0.0.1, or --insecure") from None
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
        output_max_side=args.output_max_side,
        request_timeout_s=args.request_timeout,
        token=token,
        malloc_arenas=args.malloc_arenas or None,
    )
    limit_arenas(settings.malloc_arenas)  # before the model is loaded and the server's threads start
    detector = load_detector(args)
    app = create_app(detector, settings)
    host = f"[{args.host}]" if ":" in args.host else args.host
    access = "token required" if token else ("open to this machine" if is_loopback(args.host) else "OPEN (--insecure)")
    engine = f"{detector.backend_name}" + (f", {detector.tiling.describe()}" if detector.tiling else "")
    print(f"cnc serve: {detector.source} ({engine}) on http://{host}:{args.port}/ ({access}); API docs at /docs",
          flush=True)  # fmt: skip
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
