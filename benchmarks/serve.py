"""Throughput and latency of ``cnc serve`` under concurrent clients, next to in-process batch prediction. Prints;
never asserts.

The model is a checkpoint given with ``--checkpoint``, or else ``--config``'s model (default ``offline``: the
``cnc-effnet-lite0`` preset with its shipped ImageNet weights, untrained decoder) saved to a temporary folder;
``--backend onnx|openvino`` exports it (``cnc export``) and serves and measures the exported file instead (ONNX Runtime,
OpenVINO). The images are ``--distinct`` synthetic PNGs of ``--image-size`` pixels (textured noise with a dark scratch),
cycled.

1. In-process: ``Detector.predict`` on the PNG files, ``--max-batch-size`` per call (decoding included, as in the
   server), images per second after one untimed warm-up batch.
2. The server: ``python -m cnc_ad serve`` in a subprocess on 127.0.0.1 (a free port, no token), with the same batch size
   and ``--max-wait-ms``, and no decision log unless ``--decisions DIR`` is given; ``--outbox`` also sends every
   decision to a webhook receiver in this process (an HTTP server in a thread that answers 204; a decision log in a
   temporary folder unless ``--decisions``), and counts what it received. For each concurrency C in
   ``--concurrency``, C client threads send one image per request (multipart, ``POST /v1/predict``) until ``--requests /
   len(concurrency)`` requests are done: images per second over the wall time, p50 and p99 latency, errors (any non-200
   answer or transport error), and the server's mean batch size (``/v1/stats``). The server process's resident memory
   (``VmRSS``) is read after a warm-up (a few batches at every concurrency, so the allocator has seen every batch size)
   and at the end, each time once the server has been idle for ``--idle-s`` seconds (it hands freed memory back to the
   OS when its model worker falls idle; docs/serve.md): growth after that is what a long-running server would
   accumulate. The readings right after the load and the peak (``VmHWM``) are printed too. The client threads run on the
   same machine and share its cores with the server.
3. ``--config``'s model's (the offline preset's) CPU images/s through PyTorch, ONNX Runtime and OpenVINO, side
   by side, measured by ``benchmarks/export_speed.py`` (its ``build_backends`` and ``measure``: random weights, the
   whole graph, ``--export-threads`` threads, batch ``--max-batch-size``), after the server has stopped.

The last line is

    serve: backend=<torch|onnx|openvino> log=<on|off> outbox=<on|off> rps_c32=<x> inprocess_ips=<x>
    ratio=<rps_c32 / inprocess_ips> p99_ms_c32=<x> errors=<n> rss_growth_mb=<x> ort_vs_torch=<x> ov_vs_torch=<x>
    [delivered=<decisions the webhook received>/<decisions queued>]  (with --outbox)

(one line; ``c32`` is the highest concurrency run). A full run sends at least ``--requests`` (default 2100) measured
requests, split evenly over the concurrencies (rounded up), plus a warm-up. Full run and a smoke run:

    .venv/bin/python benchmarks/serve.py
    .venv/bin/python benchmarks/serve.py --quick
    .venv/bin/python benchmarks/serve.py --outbox     # with the decision log and the outbox (issue #22: ratio >= 0.8)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import torch
from export_speed import build_backends, measure
from PIL import Image

from cnc_ad import Detector
from cnc_ad.checkpoint import save_checkpoint
from cnc_ad.config import load_config
from cnc_ad.deploy.export import random_images
from cnc_ad.model import build_model


# ------------------------------------------------------------------------------------------------------ inputs
def synthetic_pngs(count: int, size: int, seed: int = 0) -> list[bytes]:
    """``count`` PNG files (``size`` x ``size`` RGB): smooth random texture, half of them with a dark scratch."""
    rng = np.random.default_rng(seed)
    files = []
    for index in range(count):
        coarse = rng.integers(90, 200, (size // 16 + 1, size // 16 + 1, 3), dtype=np.uint8)
        texture = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), np.int16)
        image = np.clip(texture + rng.normal(0, 6, texture.shape), 0, 255).astype(np.uint8)
        if index % 2:
            top = int(rng.integers(size // 4, 3 * size // 4))
            image[top : top + max(2, size // 40), size // 5 : 4 * size // 5] = 25
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


def prepare_checkpoint(args: argparse.Namespace, workdir: Path) -> Path:
    if args.checkpoint:
        return Path(args.checkpoint)
    model = build_model(load_config(args.config).model, pretrained=True)
    return save_checkpoint(workdir / "checkpoint", model)


def prepare_model(checkpoint: Path, backend: str, workdir: Path) -> Path:
    """What ``--model`` is for ``backend``: the checkpoint (torch), or its export (``cnc export``) to ONNX or
    OpenVINO."""
    if backend == "torch":
        return checkpoint
    out = workdir / ("model.onnx" if backend == "onnx" else "model.xml")
    argv = ["-q", "export", "--checkpoint", str(checkpoint), "--format", backend, "--out", str(out)]
    done = subprocess.run([sys.executable, "-m", "cnc_ad", *argv], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"cnc export failed: {done.stderr[-2000:]}")
    return out


# ------------------------------------------------------------------------------------------------- in-process
def inprocess_throughput(model: Path, paths: list[Path], batch_size: int) -> float:
    """Images per second of ``Detector.predict`` on image files, ``batch_size`` per model call."""
    detector = Detector.load(model, device="cpu")
    detector.predict([str(p) for p in paths[:batch_size]], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    detector.predict([str(p) for p in paths], batch_size=batch_size)
    return len(paths) / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------------ server
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of process ``pid`` in MiB (``VmRSS``; ``VmHWM``: its peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def server_process(
    model: Path, args: argparse.Namespace, python: str = sys.executable, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``cnc serve --model MODEL`` run by ``python`` (another environment's interpreter: a station's, with its own
    ``env``) on a free port."""
    port = free_port()
    command = [
        python, "-m", "cnc_ad", "-q", "serve", "--model", str(model), "--port", str(port),
        "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
        "--max-queue", str(max(256, 4 * max(args.concurrency))), "--log-level", "warning",
    ]  # fmt: skip
    if model.suffix not in (".onnx", ".xml"):
        command += ["--device", "cpu"]
    decisions = getattr(args, "decisions", None)  # the figures in docs/serve.md were measured without a decision log
    command += ["--decisions", str(decisions)] if decisions else ["--no-decisions"]
    webhook = getattr(args, "webhook", None)
    if webhook:
        command += ["--webhook", webhook, "--outbox", str(args.outbox_dir)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited: {process.stdout.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("the server was not ready (/v1/ready) within 300 s: did its self-test fail?")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/v1/ready", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Receiver:
    """A webhook receiver on 127.0.0.1 (an HTTP server in a thread): counts the POSTs and their distinct ids."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.posts = 0
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with lock:
                    receiver.posts += 1
                    receiver.ids.add(str(json.loads(body).get("id")))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def load(
    url: str, files: list[bytes], requests: int, concurrency: int, record: list[float] | None = None
) -> dict[str, float]:
    """Send ``requests`` one-image requests from ``concurrency`` threads; latencies, errors and throughput (each
    request's latency in seconds is also appended to ``record``, when given)."""
    latencies: list[float] = []
    errors = 0
    issued = 0
    lock = threading.Lock()
    client = httpx.Client(timeout=120, limits=httpx.Limits(max_connections=concurrency + 2))

    def worker() -> None:
        nonlocal errors, issued
        while True:
            with lock:
                if issued >= requests:
                    return
                index = issued
                issued += 1
            body = files[index % len(files)]
            start = time.perf_counter()
            try:
                response = client.post(f"{url}/v1/predict", files=[("files", (f"{index}.png", body, "image/png"))])
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                errors += not ok

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    client.close()
    if record is not None:
        record.extend(latencies)
    ordered = sorted(latencies)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "ips": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "errors": errors,
    }


# ---------------------------------------------------------------------------------------------------- runtimes
def runtime_comparison(args: argparse.Namespace) -> dict[str, float]:
    """CPU images/s of ``--config``'s model through PyTorch, ONNX Runtime and OpenVINO (benchmarks/export_speed.py)."""
    model_config = load_config(args.config).model
    preset = f"{args.config} ({model_config.preset}, {model_config.attention} attention)"
    threads = torch.get_num_threads()
    torch.set_num_threads(args.export_threads)
    try:
        with tempfile.TemporaryDirectory(prefix="cnc-serve-bench-export-") as folder:
            backends, size = build_backends(model_config, args.export_threads, Path(folder))
            batch = args.max_batch_size
            images = random_images(batch, size).numpy()
            seconds, difference = measure(backends, images, args.export_repeats, warmup=2)
    finally:
        torch.set_num_threads(threads)
    ips = {name: batch / value for name, value in seconds.items()}
    for name in backends:
        print(
            f"{preset} on the CPU, {name:>5}: {ips[name]:7.2f} images/s (batch {batch}, {args.export_threads} "
            f"thread(s), {ips[name] / ips['torch']:.3f} x PyTorch, max |diff| {difference[name]:.2e})",
            flush=True,
        )
    return ips


# -------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="run or checkpoint folder (default: --config's model, saved to a tmp dir)")
    parser.add_argument(
        "--config", default="offline", help="config whose model is built when no checkpoint is given (default offline)"
    )
    parser.add_argument(
        "--backend",
        choices=["torch", "onnx", "openvino"],
        default="torch",
        help="serve the checkpoint (torch), or its export run by ONNX Runtime / OpenVINO (default torch)",
    )
    parser.add_argument("--requests", type=int, default=2100, help="requests in total, split over the concurrencies")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="client threads per phase")
    parser.add_argument("--image-size", type=int, default=256, help="side of the synthetic PNGs in pixels")
    parser.add_argument("--distinct", type=int, default=32, help="distinct images (cycled)")
    parser.add_argument("--inprocess-images", type=int, default=128, help="images for the in-process measurement")
    parser.add_argument("--max-batch-size", type=int, default=16, help="server and in-process batch size")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's batching wait")
    parser.add_argument(
        "--export-threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="threads of each runtime in the PyTorch / ONNX Runtime / OpenVINO comparison (default: usable cores)",
    )
    parser.add_argument("--export-repeats", type=int, default=10, help="timed calls per runtime in that comparison")
    parser.add_argument(
        "--idle-s", type=float, default=1.0, help="idle seconds before each reading of the server's memory (1)"
    )
    parser.add_argument(
        "--decisions",
        metavar="DIR",
        help="the server records every decision in this decision log (default: none, as the documented figures)",
    )
    parser.add_argument(
        "--outbox",
        action="store_true",
        help="the server also logs every decision (--decisions, else a temporary log) and sends it to a local webhook",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 60 requests, 32 in-process images")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.inprocess_images, args.distinct, args.export_repeats = 60, 32, 8, 2
    per_level = max(1, -(-args.requests // len(args.concurrency)))  # rounded up: at least --requests in all

    with tempfile.TemporaryDirectory(prefix="cnc-serve-bench-") as tmp:
        workdir = Path(tmp)
        model = prepare_model(prepare_checkpoint(args, workdir), args.backend, workdir)
        files = synthetic_pngs(args.distinct, args.image_size)
        paths = []
        for index in range(args.inprocess_images):
            path = workdir / f"image-{index:04d}.png"
            path.write_bytes(files[index % len(files)])
            paths.append(path)
        inprocess_ips = inprocess_throughput(model, paths, args.max_batch_size)
        print(
            f"in-process Detector.predict ({args.backend}): {inprocess_ips:.1f} images/s (batch {args.max_batch_size})",
            flush=True,
        )

        receiver = None
        if args.outbox:
            receiver = Receiver()
            args.webhook, args.outbox_dir = receiver.url, workdir / "outbox"
            args.decisions = args.decisions or workdir / "decisions"
        rows = []
        with server_process(model, args) as (url, process):
            for concurrency in args.concurrency:  # warm-up: every concurrency, so every batch size has been seen
                load(url, files, min(2 * max(concurrency, args.max_batch_size), per_level), concurrency)
            rss_loaded_before = rss_mb(process.pid)
            time.sleep(args.idle_s)
            rss_before, hwm_before = rss_mb(process.pid), rss_mb(process.pid, "VmHWM")
            for concurrency in args.concurrency:
                stats_before = httpx.get(f"{url}/v1/stats").json()
                row = load(url, files, per_level, concurrency)
                stats = httpx.get(f"{url}/v1/stats").json()
                calls = stats["model_calls"] - stats_before["model_calls"]
                row["mean_batch"] = (stats["images"] - stats_before["images"]) / calls if calls else float("nan")
                rows.append(row)
                print(
                    f"c={concurrency:<3d} {row['requests']:5d} requests  {row['ips']:7.1f} images/s  "
                    f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  mean batch {row['mean_batch']:5.2f}  "
                    f"errors {row['errors']}",
                    flush=True,
                )
            rss_loaded_after = rss_mb(process.pid)
            time.sleep(args.idle_s)
            rss_after, hwm_after = rss_mb(process.pid), rss_mb(process.pid, "VmHWM")
            final = httpx.get(f"{url}/v1/stats").json()
            releases = final.get("memory_releases")
            delivered = ""
            if receiver is not None:
                deadline = time.monotonic() + 60
                while (final["outbox"] or {}).get("pending") and time.monotonic() < deadline:
                    time.sleep(0.5)
                    final = httpx.get(f"{url}/v1/stats").json()
                decided = final["outbox"]["queued"]
                delivered = f" delivered={len(receiver.ids)}/{decided}"
                print(f"outbox: {receiver.posts} posts for {len(receiver.ids)} of {decided} decisions, "
                      f"{final['outbox']['pending']} pending, last error {final['outbox']['last_error']}")  # fmt: skip
                receiver.close()
    top = rows[-1]
    errors = sum(row["errors"] for row in rows)
    print(
        f"server RSS: {rss_before:.1f} MiB after warm-up, {rss_after:.1f} MiB at the end, each after {args.idle_s:g} s "
        f"idle ({rss_loaded_before:.1f} and {rss_loaded_after:.1f} MiB right after the load; peak {hwm_before:.1f} "
        f"-> {hwm_after:.1f} MiB; {releases} memory releases)"
    )
    print(f"requests: {sum(row['requests'] for row in rows)} measured (+ warm-up), {errors} errors", flush=True)
    runtimes = runtime_comparison(args)
    print(f"cores usable: {len(os.sched_getaffinity(0))} of {os.cpu_count()}; the clients share them with the server")
    on = {True: "on", False: "off"}
    print(
        f"serve: backend={args.backend} log={on[bool(args.decisions)]} outbox={on[args.outbox]} "
        f"rps_c{top['concurrency']}={top['ips']:.2f} inprocess_ips={inprocess_ips:.2f} "
        f"ratio={top['ips'] / inprocess_ips:.3f} p99_ms_c{top['concurrency']}={top['p99_ms']:.1f} errors={errors} "
        f"rss_growth_mb={rss_after - rss_before:.1f} ort_vs_torch={runtimes['ort'] / runtimes['torch']:.3f} "
        f"ov_vs_torch={runtimes['ov'] / runtimes['torch']:.3f}{delivered}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
