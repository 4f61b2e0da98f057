"""``cnc predict``: score new images with a trained model (checkpoint, ONNX graph or OpenVINO IR) into a folder.

A thin consumer of :class:`cnc_ad.deploy.Detector`: the folder and the records are :mod:`cnc_ad.deploy.predict`'s,
the watched folder :mod:`cnc_ad.deploy.watch`'s.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from cnc_ad.cli._options import (
    OUTBOX_DRAIN_S,
    add_decision_log,
    add_device,
    add_json,
    add_model,
    add_outbox,
    add_progress,
    add_tiling,
    add_weights,
    check_outbox,
    emit_json,
    load_detector,
    open_decision_log,
    open_outbox,
)

if TYPE_CHECKING:
    from cnc_ad.deploy import Detector
    from cnc_ad.deploy.decisions import DecisionLog
    from cnc_ad.deploy.watch import After

EPILOG = """\
examples:
  cnc predict --model runs/demo images/ --out predictions
  cnc predict --model runs/demo 'line3/**/*.jpg' part_0042.png --threshold 0.35
  cnc predict --model model.onnx images/ --out predictions --resume       # ONNX Runtime, no torch needed
  cnc predict --model model.xml images/ --out predictions                 # OpenVINO (model.bin beside model.xml)
  cnc predict --model runs/line3 --watch incoming/ --out predictions --after move:done/
  cnc predict --model model.xml --watch /mnt/share/cam1 --poll 2          # network share: list every 2 s
  cnc predict --model runs/pcb scans/ --tile 512 --thresholds tiled.json  # 6000 px scans, small defects

INPUT: image files, folders (searched recursively) or glob patterns (quote them); any size or mode Pillow reads.

written under --out:
  predictions.jsonl   one line per image, appended and fsynced as it is done:
                      {"path", "score", "is_anomalous", "map", "mask", "overlay"} (files relative to --out)
  predictions.csv     the same as a table, written at the end (also after an interruption)
  errors.jsonl        {"path", "error"} per file that could not be decoded (it is skipped, the run goes on)
  maps/<name>.npy     anomaly map at the image's own size (float16 by default, --map-dtype float32)
  masks/<name>.png    map >= pixel threshold (white = anomalous)
  overlays/<name>.png heatmap over the image (scale 0 to 2 x pixel threshold)
  <name> is the file stem plus a hash of its absolute path, so equal names in different folders never clash.

thresholds: an image is anomalous when score >= threshold. The default is the threshold stored for the model (all
categories, or --category's): beside a checkpoint; for an exported model, beside the file (set by `cnc calibrate
--model FILE`), else the ones embedded at export. They were set by training on held-out good images, by `cnc calibrate`,
or are the F1-max ones of `cnc eval` (docs/thresholds.md); --threshold overrides them. Masks use the stored pixel
threshold (or --pixel-threshold), else the image threshold. Without any threshold, is_anomalous is null and no masks are
written.

--watch DIR: keep running and score each image written into DIR (and its subfolders) once its size and
modification time have not changed for --settle seconds (default 1), until Ctrl-C or SIGTERM. Each file gets exactly
one predictions.jsonl line, also across restarts: on start the images already in DIR that predictions.jsonl does not
record are scored, the recorded ones never again. --after leave (default) leaves files where they are;
--after move:DIR2 moves each file into DIR2 (same relative path; a different file of that name is never overwritten)
once its line is on disk. A file that cannot be decoded gets an errors.jsonl line, stays, and is tried again when it
changes. Change notifications come from watchfiles; --poll SECONDS lists the folder instead (network shares, where
notifications do not arrive; also the fallback without watchfiles). See docs/watch.md.

--tile PX: score each image by overlapping PX x PX tiles at its own resolution (--tile-overlap, default 0.25 of a
tile), each resized to the model's input, their maps stitched into one map of the whole image; the score is the
model's score rule on that map. For large scans with small defects, which a resize of the whole image to the model's
input (256 px for the offline preset) shrinks below one token. Choose PX so that a tile shows the part at the scale
of the training images. Thresholds set on whole images do not carry over (a tiled score is the maximum over more of
the image): set them for tiled scoring with `cnc calibrate --tile PX --save FILE` and pass --thresholds FILE, or
give --threshold; a warning says when the thresholds in use were not set with the same tiles.

--decisions DIR: also append every decision to the decision log DIR (off by default: predictions.jsonl records them
here), as `cnc serve` does (one fsynced JSON line each, with the model, the threshold's rule and image count, the
image's digest; each predictions.jsonl line then names its decision), for `cnc decisions DIR` and the line loop;
--keep none (default) | anomalous | all keeps the images and heatmaps there too, within --log-max-mb. One process
writes into a decision log at a time.

--webhook URL / --mqtt mqtt://host:1883/cnc/{category}/decision (with --decisions; each repeatable): send every
decision's record out (an HTTP POST of JSON; an MQTT message, QoS 1) from the durable queue --outbox DIR (default
./outbox), with retries; what a receiver has not taken when the command ends (after up to 5 s) is sent at its next
start with the same --outbox. See docs/serve.md#signals-out.

--json: one JSON object on stdout at the end (counts, output folder; with --watch when it stops); every other line
goes to stderr.

exit status: 0 when every image was predicted (or was done before, with --resume); 0 with a warning when some files
could not be decoded (listed in errors.jsonl), or 3 with --strict; 3 when no image could be predicted.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="score new images: anomaly score, decision, map, mask and heatmap overlay per image",
        description="Score image files with a trained model (checkpoint, ONNX or OpenVINO) and write maps, masks, "
        "overlays and a table.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model(parser)
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders or glob patterns")
    parser.add_argument("--watch", metavar="DIR", help="keep running: score each image written into DIR, once")
    parser.add_argument(
        "--after",
        default="leave",
        metavar="leave|move:DIR",
        help="--watch: leave scored files (default), or move them into DIR once recorded",
    )
    parser.add_argument(
        "--poll", type=float, metavar="SECONDS", help="--watch: list the folder every SECONDS (network shares)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="--watch: a file is complete once unchanged this long (default 1)",
    )
    parser.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    parser.add_argument("--threshold", type=float, help="image threshold (default: the stored one)")
    parser.add_argument("--pixel-threshold", type=float, help="mask threshold (default: stored, else --threshold)")
    parser.add_argument("--category", help="use this category's stored thresholds instead of the overall ones")
    parser.add_argument("--thresholds", metavar="FILE", help="a thresholds.json to use (default: the stored one)")
    parser.add_argument("--batch-size", type=int, default=16, help="images (with --tile: tiles) per batch (default 16)")
    add_tiling(parser)
    add_device(parser, default="auto", note="checkpoints; OpenVINO: its device name")
    parser.add_argument("--num-workers", type=int, default=2, help="image decoding threads (default 2)")
    parser.add_argument("--map-dtype", choices=["float16", "float32"], default="float16", help="dtype of the .npy maps")
    parser.add_argument("--overlay-max-side", type=int, default=2048, help="longest overlay side in pixels")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--resume", action="store_true", help="skip images already in --out's predictions.jsonl")
    what.add_argument("--overwrite", action="store_true", help="start --out's predictions.jsonl afresh")
    parser.add_argument("--strict", action="store_true", help="exit 3 when any input could not be decoded")
    add_decision_log(parser, default=None, keep="none")
    add_outbox(parser)
    add_weights(parser)
    add_progress(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cnc_ad import distributed as dist
    from cnc_ad.deploy.predict import ERRORS_FILE, collect_inputs, predict_files
    from cnc_ad.deploy.watch import After
    from cnc_ad.errors import ConfigError, DataError

    if args.watch and args.inputs:
        raise ConfigError("--watch DIR takes no INPUT arguments: watch one folder, or predict the inputs")
    if not args.watch and not args.inputs:
        raise DataError("no inputs: pass image files, folders or glob patterns (or --watch DIR)")
    check_outbox(args)
    if args.watch:
        if dist.launched_by_torchrun():
            raise ConfigError("--watch runs in one process; start it without torchrun")
        if args.overwrite:
            raise ConfigError("--watch always resumes --out's predictions.jsonl; pass another --out to start afresh")
        if args.settle < 0 or (args.poll is not None and not args.poll > 0):
            raise ConfigError("--settle must be >= 0 and --poll > 0 seconds")
        try:
            after = After.parse(args.after)
        except ConfigError as err:
            raise ConfigError(
                f"--after {args.after!r}: use leave, or move:DIR (a folder to move scored files into)"
            ) from err
        detector = _detector(args)
        decisions = open_decision_log(args, detector, "watch")
        outbox = None
        try:
            outbox = open_outbox(args, decisions)
            return _watch(args, detector, after, decisions)
        finally:
            if outbox is not None:
                outbox.close(drain_s=OUTBOX_DRAIN_S)
            if decisions is not None:
                decisions.close()
    if args.after != "leave" or args.poll is not None:
        raise ConfigError("--after and --poll apply to --watch DIR only")
    if args.decisions is not None and dist.launched_by_torchrun():
        raise ConfigError("--decisions DIR is written by one process; predict without torchrun, or without --decisions")
    paths = collect_inputs(args.inputs)
    detector = _detector(args)
    decisions = open_decision_log(args, detector, "predict")
    outbox = None
    try:
        outbox = open_outbox(args, decisions)
        summary = predict_files(
            detector,
            paths,
            args.out,
            batch_size=args.batch_size,
            threshold=args.threshold,
            pixel_threshold=args.pixel_threshold,
            category=args.category,
            resume=args.resume,
            overwrite=args.overwrite,
            workers=args.num_workers,
            map_dtype=args.map_dtype,
            overlay_max_side=args.overlay_max_side,
            progress=not args.no_progress,
            decisions=decisions,
        )
    finally:
        if outbox is not None:
            outbox.close(drain_s=OUTBOX_DRAIN_S)
        if decisions is not None:
            decisions.close()
    if not dist.is_main_process():
        return 0
    if args.json:
        emit_json(
            args,
            {
                "out": str(summary.out),
                "predictions": str(summary.out / "predictions.jsonl"),
                "inputs": summary.total,
                "predicted": summary.predicted,
                "anomalous": summary.anomalous,
                "done_before": summary.skipped,
                "failed": summary.failed,
            },
        )
    else:
        print(
            f"{summary.predicted} predicted ({summary.anomalous} anomalous), {summary.skipped} done before, "
            f"{summary.failed} failed; results: {summary.out}"
        )
    if summary.failed:
        message = f"{summary.failed} of {summary.total} inputs could not be decoded; see {summary.out / ERRORS_FILE}"
        if args.strict or summary.predicted + summary.skipped == 0:
            raise DataError(message)
        print(f"warning: {message}", file=sys.stderr)
    return 0


def _detector(args: argparse.Namespace) -> Detector:
    from cnc_ad import distributed as dist
    from cnc_ad.deploy.backends import is_exported
    from cnc_ad.errors import ConfigError

    if dist.launched_by_torchrun():
        if is_exported(args.model):
            raise ConfigError("an exported model (--model FILE.onnx / FILE.xml) runs in one process; start it without "
                              "torchrun")  # fmt: skip
        if not args.watch:  # under torchrun: join the group, shard the inputs
            from cnc_ad.device import resolve_device

            dist.init_from_env(resolve_device(args.device))
    return load_detector(args)


def _watch(args: argparse.Namespace, detector: Detector, after: After, decisions: DecisionLog | None) -> int:
    from cnc_ad.deploy.watch import watch_folder

    summary = watch_folder(
        detector,
        args.watch,
        args.out,
        after=after,
        poll=args.poll,
        settle=args.settle,
        batch_size=args.batch_size,
        threshold=args.threshold,
        pixel_threshold=args.pixel_threshold,
        category=args.category,
        map_dtype=args.map_dtype,
        overlay_max_side=args.overlay_max_side,
        decisions=decisions,
    )
    if args.json:
        emit_json(
            args,
            {
                "out": str(summary.out),
                "predictions": str(summary.out / "predictions.jsonl"),
                "watched": str(summary.folder),
                "mode": summary.mode,
                "predicted": summary.predicted,
                "anomalous": summary.anomalous,
                "failed": summary.failed,
                "moved": summary.moved,
                "done_before": summary.recorded_before,
                "stopped_by": summary.stopped_by,
            },
        )
    else:
        print(
            f"{summary.predicted} predicted ({summary.anomalous} anomalous), {summary.failed} failed, "
            f"{summary.moved} moved; stopped by {summary.stopped_by}; results: {summary.out}"
        )
    return 0
