"""Inference and training cost of the CNC presets, measured side by side in one run. Prints; never asserts.

Random weights (``build_model(cfg, pretrained=False)``), random images in [0, 1]. Per preset:

- (a) ``encode``: the frozen encoder alone, seconds per image; (b) ``predict``: encoder, bottleneck, MoE, decoder,
  anomaly map at ``map_size``, blur and score, seconds per image. Both under ``torch.inference_mode`` and the
  ``--amp`` autocast. ``predict_overhead = b / a``; ``predict_flops_ratio`` = FLOPs(predict) / FLOPs(encode) counted
  by ``torch.utils.flop_counter.FlopCounterMode`` on one image; ``efficiency = overhead / flops_ratio`` (1.0: the
  parts after the encoder run as fast per FLOP as the encoder; target for cnc-vitl14-336 <= 1.15).
- (c) training with the feature cache: ``cnc_ad.train.train_step``, the step training takes (the learning rate set,
  ``model.training_losses`` under autocast on features read from a ``cnc_ad.feature_cache.FeatureCache`` at
  ``cache_dtype`` float16, the finiteness check, backward, Adam step); (d) without the cache:
  ``cnc_ad.train.encode_batch`` (the encoder under ``no_grad`` + autocast, features rounded to float16), then the
  same step. An "epoch" is MVTec AD's 3629 training images in
  batches of ``--batch-size``: the median step time times the number of steps. The one-time cache fill (encode +
  store, per image) is reported separately, not amortised. ``cache_speedup = d / c``; ``cache_ideal`` = FLOPs(encode
  of a batch + forward/backward of the step) / FLOPs(forward/backward of the step), counted on the real step (target
  for cnc-vitl14-336: cache_speedup >= 0.85 x cache_ideal).
- Peak memory of each phase: on CUDA ``torch.cuda.max_memory_allocated`` (reset before the phase); on the CPU the
  process's peak resident set (``VmHWM``), reset to the current RSS before each phase through
  ``/proc/self/clear_refs``, so each phase's peak includes the weights and whatever earlier phases left allocated
  (the column says ``rss``); where that reset is not allowed, the process peak so far (column ``rss_cum``).

Each timing is the median of ``--repeats`` runs (``--steps`` steps for training) after ``--warmup`` untimed runs,
with ``torch.cuda.synchronize`` around each on CUDA. The last line is

    speed: predict_overhead=<b/a> predict_flops_ratio=<x> cache_speedup=<d/c> cache_ideal=<x>

for cnc-vitl14-336, or for the last preset run when it was not among ``--presets`` (the line then says so).

    .venv/bin/python benchmarks/speed.py --presets tiny cnc-effnet-lite0 --images 8 --batch-size 4
    .venv/bin/python benchmarks/speed.py --presets cnc-vitl14-336 --images 2 --batch-size 2 --steps 2 --repeats 1
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cnc_ad.config import ModelConfig, TrainConfig
from cnc_ad.device import autocast, resolve_device
from cnc_ad.feature_cache import CACHE_DTYPES, FeatureCache
from cnc_ad.model import build_model
from cnc_ad.train import TrainingLosses, encode_batch, learning_rate, train_step

PRESETS = ("tiny", "cnc-effnet-lite0", "cnc-vitb16-224", "cnc-vitl14-336")
HEADLINE = "cnc-vitl14-336"
MVTEC_TRAIN_IMAGES = 3629  # MVTec AD's normal training images, all 15 categories: one epoch


# ------------------------------------------------------------------------------------------------- measurement
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` (matmuls, convolutions, attention) by ``FlopCounterMode``."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _read_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak RSS (VmHWM) of this process to its current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a phase in MiB: CUDA allocator peak on CUDA, else the resident-set peak (see module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda" if device.type == "cuda" else ("rss" if _reset_rss_peak() else "rss_cum")

    @contextlib.contextmanager
    def phase(self, into: dict[str, float], key: str) -> Iterator[None]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "rss":
            _reset_rss_peak()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            into[key] = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            hwm = _read_status_kb("VmHWM") if self.kind == "rss" else None
            into[key] = (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


# ------------------------------------------------------------------------------------------------- one preset
def bench_preset(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Measure one preset; returns the row of the table (seconds, FLOPs, MiB)."""
    torch.manual_seed(0)
    memory = PeakMemory(device)
    row: dict[str, Any] = {"preset": name, "device": str(device), "amp": args.amp, "memory_kind": memory.kind}
    start = time.perf_counter()
    model = build_model(ModelConfig(preset=name), pretrained=False).to(device)
    row["build_s"] = time.perf_counter() - start
    size, batch = model.image_size, args.batch_size
    images = torch.rand(args.images, 3, size, size)
    batches = [images[k : k + batch] for k in range(0, args.images, batch)]
    batches = [b for b in batches if b.shape[0] == batch] or [images[:batch]]
    n_batch = batches[0].shape[0]
    first = batches[0].to(device)

    # (a) encoder, (b) predict
    model.eval()
    model.store_text_features()  # a trained model carries them; predict never runs the text tower

    def run_all(fn: Callable[[torch.Tensor], Any]) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode(), autocast(device, args.amp):
                for b in batches:
                    fn(b.to(device, non_blocking=True))

        return run

    n_images = n_batch * len(batches)
    with memory.phase(row, "encode_mib"):
        row["encode_s"] = median_time(run_all(model.encode), device, args.repeats, args.warmup) / n_images
    with memory.phase(row, "predict_mib"):
        row["predict_s"] = median_time(run_all(model.predict), device, args.repeats, args.warmup) / n_images
    one = first[:1]
    with torch.inference_mode():
        row["encode_flops"] = count_flops(lambda: model.encode(one))
        row["predict_flops"] = count_flops(lambda: model.predict(one))

    row["predict_img_s"] = 1.0 / row["predict_s"]
    row["predict_overhead"] = row["predict_s"] / row["encode_s"]
    row["predict_flops_ratio"] = row["predict_flops"] / row["encode_flops"]
    row["predict_efficiency"] = row["predict_overhead"] / row["predict_flops_ratio"]
    trainable, frozen = model.parameter_counts()
    row.update(trainable_params=trainable, frozen_params=frozen, batch_size=n_batch, images=n_images)
    if args.no_train:
        return row

    # (c) training from the feature cache, (d) training without it
    tcfg = TrainConfig(batch_size=n_batch)
    dtype = CACHE_DTYPES[tcfg.cache_dtype]
    model.train()
    losses_of = TrainingLosses(model, tcfg)
    optimizer = torch.optim.Adam(
        model.trainable_parameters(), lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay
    )
    steps_taken = iter(range(10**9))

    def step(features: list[torch.Tensor]) -> None:
        lr = learning_rate(next(steps_taken), 10**9, tcfg)
        train_step(losses_of, optimizer, features, lr=lr, device=device, amp=args.amp, grad_clip=tcfg.grad_clip)

    with memory.phase(row, "cache_fill_mib"):
        fill_start = time.perf_counter()
        shapes = [(f.shape[1], f.shape[2]) for f in model.encode(first[:1])]
        cache = FeatureCache(shapes, n_images, dtype, None)
        for k, b in enumerate(batches):
            cache.put(torch.arange(k * n_batch, (k + 1) * n_batch), encode_batch(model, b, device, args.amp, dtype))
        synchronize(device)
        row["cache_fill_s"] = (time.perf_counter() - fill_start) / n_images
    row["cache_mib"] = FeatureCache.nbytes(shapes, 1, cache.dtype) / 2**20  # per image
    order = np.random.default_rng(0).permutation(n_images)
    rows = [order[k % len(batches) * n_batch : (k % len(batches) + 1) * n_batch] for k in range(args.steps)]
    cycle = iter(range(10**9))

    def cached_step() -> None:
        step(cache.get(rows[next(cycle) % len(rows)], device))

    def uncached_step() -> None:
        step(encode_batch(model, batches[next(cycle) % len(batches)], device, args.amp, dtype))

    with memory.phase(row, "train_cache_mib"):
        row["train_cache_step_s"] = median_time(cached_step, device, args.steps, args.warmup)
    with memory.phase(row, "train_nocache_mib"):
        row["train_nocache_step_s"] = median_time(uncached_step, device, args.steps, args.warmup)
    features = cache.get(rows[0], device)
    row["step_flops"] = count_flops(lambda: step(features))  # Adam's element-wise updates count no FLOPs here
    row["encode_batch_flops"] = count_flops(lambda: encode_batch(model, batches[0], device, args.amp, dtype))
    optimizer.zero_grad(set_to_none=True)

    steps_per_epoch = MVTEC_TRAIN_IMAGES // n_batch
    row.update(
        steps=args.steps,
        train_cache_epoch_s=row["train_cache_step_s"] * steps_per_epoch,
        train_nocache_epoch_s=row["train_nocache_step_s"] * steps_per_epoch,
        train_cache_img_s=n_batch / row["train_cache_step_s"],
        train_nocache_img_s=n_batch / row["train_nocache_step_s"],
        cache_speedup=row["train_nocache_step_s"] / row["train_cache_step_s"],
        cache_ideal=(row["encode_batch_flops"] + row["step_flops"]) / row["step_flops"],
    )
    row["cache_fraction_of_ideal"] = row["cache_speedup"] / row["cache_ideal"]
    return row


# ------------------------------------------------------------------------------------------------- report
COLUMNS = [
    ("preset", "{}", "preset"),
    ("encode ms/img", "{:.1f}", "encode_s", 1e3),
    ("predict ms/img", "{:.1f}", "predict_s", 1e3),
    ("b/a", "{:.3f}", "predict_overhead"),
    ("flops b/a", "{:.3f}", "predict_flops_ratio"),
    ("(b/a)/flops", "{:.3f}", "predict_efficiency"),
    ("fill ms/img", "{:.1f}", "cache_fill_s", 1e3),
    ("cache s/epoch", "{:.0f}", "train_cache_epoch_s"),
    ("no-cache s/epoch", "{:.0f}", "train_nocache_epoch_s"),
    ("d/c", "{:.3f}", "cache_speedup"),
    ("ideal", "{:.3f}", "cache_ideal"),
    ("d/c/ideal", "{:.3f}", "cache_fraction_of_ideal"),
    ("mem enc", "{:.0f}", "encode_mib"),
    ("mem pred", "{:.0f}", "predict_mib"),
    ("mem fill", "{:.0f}", "cache_fill_mib"),
    ("mem cache", "{:.0f}", "train_cache_mib"),
    ("mem no-cache", "{:.0f}", "train_nocache_mib"),
]


def format_table(rows: list[dict[str, Any]]) -> str:
    header = [c[0] for c in COLUMNS]
    body = []
    for row in rows:
        cells = []
        for column in COLUMNS:
            value = row.get(column[2])
            scale = column[3] if len(column) > 3 else None
            cells.append("-" if value is None else column[1].format(value * scale if scale else value))
        body.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) for cells in body]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument("--images", type=int, default=8, help="random images per preset (whole batches are used)")
    parser.add_argument("--batch-size", type=int, default=4, help="batch for encode, predict and training")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per mode (median taken)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over the images for encode/predict")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before each timing")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "off"], help="as train.amp")
    parser.add_argument("--no-train", action="store_true", help="measure encode and predict only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out-json", type=Path, default=None, help="write every measured row here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(
        f"speed: torch {torch.__version__}, {name}, amp={args.amp}, images={args.images}, batch={args.batch_size}, "
        f"steps={args.steps}, repeats={args.repeats}, warmup={args.warmup}"
    )
    rows = []
    for preset in args.presets:
        row = bench_preset(preset, args, device)
        rows.append(row)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        line = (
            f"  {preset}: built in {row['build_s']:.1f} s; {row['trainable_params'] / 1e6:.1f} M trainable, "
            f"{row['frozen_params'] / 1e6:.1f} M frozen; GFLOPs/img encode {row['encode_flops'] / 1e9:.2f}, predict "
            f"{row['predict_flops'] / 1e9:.2f}; predict img/s {row['predict_img_s']:.2f}"
        )
        if "step_flops" in row:
            line += (
                f"; train step (batch {row['batch_size']}) {row['step_flops'] / 1e9:.1f} GFLOPs fwd+bwd; train img/s "
                f"cache {row['train_cache_img_s']:.2f}, no cache {row['train_nocache_img_s']:.2f}"
            )
        print(line, flush=True)
    print()
    print(f"times: median; epoch = {MVTEC_TRAIN_IMAGES} images (MVTec AD train) at the batch size, cache fill apart;")
    print(f"memory: peak MiB per phase ({rows[0]['memory_kind']})")
    print(format_table(rows))
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps({"args": vars(args) | {"out_json": str(args.out_json)}, "rows": rows},
                                            indent=2, default=str))  # fmt: skip
    headline = next((r for r in rows if r["preset"] == HEADLINE), rows[-1])
    if headline["preset"] != HEADLINE:
        print(f"({HEADLINE} was not run; the last line is for {headline['preset']})")
    keys = ("predict_overhead", "predict_flops_ratio", "cache_speedup", "cache_ideal")
    values = [headline.get(k, math.nan) for k in keys]
    print("speed: " + " ".join(f"{k}={v:.3f}" for k, v in zip(keys, values, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
