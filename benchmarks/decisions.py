"""What recording a decision costs: ``DecisionLog.record`` per decision, in a temporary folder in the working directory
(run it on the disk the log will be on).
Prints; never asserts.

Three cases, ``--decisions`` each: a decision whose image is not kept (one fsynced JSON line: ``keep="none"``, and every
ok part under ``keep="anomalous"``); one whose image (a ``--image-size`` PNG) and heatmap overlay (drawn from the
decoded image, as the server does, and kept as JPEG) are kept (``keep="all"``, and every anomalous part under
``keep="anomalous"``); and drawing and encoding the overlay alone (the CPU part of keeping). The last line is

    decisions: record_ms=<x> keep_ms=<x> overlay_ms=<x> keep_vs_record=<keep_ms / record_ms>

    .venv/bin/python benchmarks/decisions.py
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cnc_ad.deploy.decisions import DecisionLog
from cnc_ad.deploy.detector import ImageResult, ThresholdChoice
from cnc_ad.visualize import to_jpeg_bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=200, help="decisions per case (default 200)")
    parser.add_argument("--image-size", type=int, default=1024, help="side of the kept PNG in pixels (default 1024)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    pixels = rng.normal(150, 20, (args.image_size, args.image_size, 3)).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    data = buffer.getvalue()
    result = ImageResult(0.7, rng.random((64, 64)).astype(np.float32), pixels.shape[:2], 0.5, 0.5)
    choice = ThresholdChoice(0.5, 0.5, "__all__", "false_alarm_rate=0.01", 100, "0123456789abcdef")

    def draw() -> np.ndarray:
        return result.overlay(pixels)

    timings = {}
    with tempfile.TemporaryDirectory(prefix="cnc-decisions-bench-", dir=".") as tmp:
        for case, keep in (("record", "none"), ("keep", "all")):
            with DecisionLog(Path(tmp) / case, source="serve", keep=keep) as log:  # type: ignore[arg-type]
                log.record(result, choice, name="warm-up.png", image=data, overlay=draw)
                start = time.perf_counter()
                for index in range(args.decisions):
                    log.record(result, choice, name=f"part{index}.png", image=data, overlay=draw)
                timings[case] = 1000 * (time.perf_counter() - start) / args.decisions
        start = time.perf_counter()
        for _ in range(max(1, args.decisions // 4)):
            to_jpeg_bytes(draw())
        timings["overlay"] = 1000 * (time.perf_counter() - start) / max(1, args.decisions // 4)
    print(f"PNG of {args.image_size} px: {len(data) / 1024:.0f} KiB; {args.decisions} decisions per case")
    record, keep, drawing = timings["record"], timings["keep"], timings["overlay"]
    ratio = keep / record
    print(f"decisions: record_ms={record:.2f} keep_ms={keep:.2f} overlay_ms={drawing:.2f} keep_vs_record={ratio:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
