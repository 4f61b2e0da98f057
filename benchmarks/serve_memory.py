"""Resident memory of ``cnc serve`` over rounds of requests: does it level off? Prints; never asserts.

Starts the server like ``benchmarks/serve.py`` (the offline preset's model, random decoder), warms it up at 1, 8 and 32
concurrent clients, then runs ``--rounds`` rounds of ``--per-level`` requests at each of those concurrencies and prints
the server's ``VmRSS`` after the warm-up and after each round: right after the load, and after ``--idle-s`` seconds
idle (the server hands freed memory back to the OS when its model worker falls idle), with ``/v1/stats``'s count of
those releases, and each round's images/s per concurrency. Set ``MALLOC_ARENA_MAX`` in the environment to see the
allocator's share.

The last line sums up the soak: every measured request (warm-up excluded), those that failed (a non-200 answer or a
transport error), the memory after the warm-up and after the last round (each after ``--idle-s`` idle), and the 99th
percentile latency over all of them:

    soak: requests=<n> errors=<n> rss_start_mb=<x> rss_end_mb=<x> p99_ms=<x>

The soak (20 rounds of 3 x 334 requests: 20,040) and a smoke run:

    .venv/bin/python benchmarks/serve_memory.py --rounds 20
    .venv/bin/python benchmarks/serve_memory.py --rounds 2 --per-level 10
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import serve as bench


def main(argv: list[str] | None = None) -> int:
    """Print the server's resident memory after a warm-up and after each round."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of requests (default 5)")
    parser.add_argument(
        "--per-level", type=int, default=334, help="requests per concurrency per round (default 334: 1,002 a round)"
    )
    parser.add_argument("--config", default="offline", help="config whose model is served (default offline)")
    parser.add_argument("--idle-s", type=float, default=1.0, help="idle seconds before the second reading (1)")
    args = parser.parse_args(argv)
    settings = argparse.Namespace(
        checkpoint=None, config=args.config, max_batch_size=16, max_wait_ms=5.0, concurrency=[1, 8, 32]
    )
    with tempfile.TemporaryDirectory(prefix="cnc-serve-memory-") as tmp:
        checkpoint = bench.prepare_checkpoint(settings, Path(tmp))
        files = bench.synthetic_pngs(32, 256)
        with bench.server_process(checkpoint, settings) as (url, process):
            for concurrency in settings.concurrency:
                bench.load(url, files, 2 * max(concurrency, 16), concurrency)

            def report(label: str, speeds: str = "") -> float:
                loaded = bench.rss_mb(process.pid)
                time.sleep(args.idle_s)
                releases = bench.httpx.get(f"{url}/v1/stats").json().get("memory_releases")
                idle = bench.rss_mb(process.pid)
                print(
                    f"{label}: {loaded:.1f} MiB right after the load, {idle:.1f} MiB after "
                    f"{args.idle_s:g} s idle ({releases} memory releases so far){speeds}",
                    flush=True,
                )
                return idle

            rss_start = rss_end = report("after warm-up")
            latencies: list[float] = []
            errors = 0
            for round_ in range(args.rounds):
                speeds = []
                for concurrency in settings.concurrency:
                    result = bench.load(url, files, args.per_level, concurrency, record=latencies)
                    errors += int(result["errors"])
                    speeds.append(
                        f"{result['ips']:.1f}" + (f" ({result['errors']:g} errors)" if result["errors"] else "")
                    )
                rss_end = report(
                    f"round {round_}",
                    f"; images/s at {', '.join(map(str, settings.concurrency))}: {' / '.join(speeds)}",
                )
    ordered = sorted(latencies)
    p99_ms = 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan")
    print(
        f"soak: requests={len(latencies)} errors={errors} rss_start_mb={rss_start:.1f} rss_end_mb={rss_end:.1f} "
        f"p99_ms={p99_ms:.1f}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
