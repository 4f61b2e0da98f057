"""``cnc calibrate``: set decision thresholds from good images only, at a chosen false-alarm rate (a checkpoint or an
exported model; :mod:`cnc_ad.deploy.calibrate` does the work).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from cnc_ad.cli._options import (
    add_device,
    add_json,
    add_model,
    add_tiling,
    add_weights,
    emit_json,
    load_detector,
    tiling_from,
)

EPILOG = """\
examples:
  cnc calibrate --model runs/line3 --normal batches/2026-11-28/ --category pump
  cnc calibrate --model runs/line3 --normal 'good/**/*.png' --false-alarm-rate 0.005
  cnc calibrate --model model.xml --normal good/ --category pump        # an exported model, on a station
  cnc calibrate --model runs/mvtec --data-root /data/mvtec_ad           # the images training held out
  cnc calibrate --model runs/pcb --normal good_scans/ --tile 512 --save tiled.json   # for cnc predict --tile
  cnc calibrate --model model.xml --from-feedback decisions/ --category pump   # the parts operators confirmed good

what it does: scores good images with the model and sets, per category, the image threshold above which a share
R (--false-alarm-rate) of good images fall, and the pixel threshold above which a share R of their map values fall
(a mask marks about R of a good image). Images of no named category (--normal without --category) set the shared
threshold only, which `cnc predict` and `cnc serve` use when no category is given; every image counts for it.

the rate needs images: with N good images a rate below 1/N cannot be measured (0.01 needs 100): then the threshold
is the largest good score plus 5 % of the spread, and its rule says so (false_alarm_rate=R;max+margin). Fewer than
--min-images images of a category is an error. Give it good parts only: a defect among them raises the thresholds.

--data-root (checkpoints): `cnc train` keeps a share of each category's good training images aside
(data.calibration_share, default 0.1; at least data.calibration_min, default 5; none for categories under 2 x that) and
sets thresholds on them after training. This recomputes them (e.g. at another rate) from the same dataset, split as the
run's config.yaml says.

stored: beside the checkpoint (thresholds.json), where `cnc predict`, `cnc serve` and `cnc export` find them; for an
exported model, beside its file (model.thresholds.json for model.onnx or model.xml), where they take precedence over the
ones embedded at export. Each value keeps the rule that made it. F1-max thresholds from `cnc eval` (labelled defects)
take precedence and are kept; --replace-f1-max replaces them. See docs/thresholds.md. --save FILE writes them to FILE
instead and changes nothing beside the checkpoint.

--from-feedback DIR: the line loop. DIR is a decision log (`cnc serve --decisions DIR`, default ./decisions) where
operators marked decisions on the page ("false alarm / good", "missed defect") or through POST /v1/feedback. The
images of the parts they confirmed good (kept by the server: --keep anomalous keeps every false alarm's) are the good
images here, by the category each was decided for (with --category: that category's only), together with any --normal
or --data-root images: give those too, so that the thresholds rest on every good image you have, not on the false
alarms alone. Then the parts confirmed defective are scored against the new thresholds and listed: which of them would
now be flagged. Fewer good images than --min-images (5) per category is an error; lower it knowingly (with N images
the threshold is the largest score plus a margin until N reaches 1/R). `POST /v1/reload` (or the page's button) makes
a running server decide by the new thresholds.

--tile PX [--tile-overlap SHARE]: score the good images by tiles, as `cnc predict --tile` does; such thresholds hold
for tiled scoring only (a tiled score is the maximum over more of the image), so they need --save FILE; their rules
end with ";tiles=PX/SHARE", and `cnc predict --tile PX --thresholds FILE` uses them.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="set thresholds from good images only, at a false-alarm rate (no defect images needed)",
        description="Set image and pixel thresholds for a model from images of good parts only: a share "
        "--false-alarm-rate of good images (pixels) is called anomalous.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model(parser)
    parser.add_argument(
        "--normal", nargs="+", metavar="INPUT", help="good images: files, folders (searched recursively) or globs"
    )
    parser.add_argument(
        "--category",
        help="the category of the --normal images (default: none; shared threshold); with --from-feedback: only that "
        "category's decisions",
    )
    parser.add_argument(
        "--from-feedback",
        metavar="DIR",
        help="a decision log: use the kept images of the parts operators confirmed good, and check the ones confirmed "
        "defective",
    )
    parser.add_argument("--data-root", help="a dataset: use each category's good training images the run held out")
    parser.add_argument("--format", help="layout of --data-root (auto-detected by default)")
    parser.add_argument(
        "--false-alarm-rate", type=float, default=0.01, metavar="R", help="share of good images flagged (default 0.01)"
    )
    parser.add_argument(
        "--pixel-false-alarm-rate", type=float, metavar="R", help="share of good pixels marked (default: R)"
    )
    parser.add_argument("--replace-f1-max", action="store_true", help="replace F1-max thresholds from `cnc eval` too")
    parser.add_argument("--min-images", type=int, default=5, help="fewest good images per category (default 5)")
    parser.add_argument("--batch-size", type=int, default=16, help="images (with --tile: tiles) per batch (default 16)")
    parser.add_argument("--save", metavar="FILE", help="write the thresholds to FILE, not beside the model")
    add_tiling(parser)
    add_device(parser, default="auto", note="checkpoints; OpenVINO: its device name")
    parser.add_argument("--num-workers", type=int, default=2, help="image decoding threads (default 2)")
    parser.add_argument("--skip-bad", action="store_true", help="leave unreadable images out instead of stopping")
    add_weights(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cnc_ad.data.samples import held_out_by_category
    from cnc_ad.deploy.calibrate import (
        calibrate_detector,
        check_defects,
        check_rate,
        feedback_images,
        store_thresholds,
    )
    from cnc_ad.deploy.predict import collect_inputs
    from cnc_ad.errors import ConfigError
    from cnc_ad.thresholds import ALL

    if not args.normal and not args.data_root and not args.from_feedback:
        raise ConfigError(
            "pass --normal with folders of good images, --data-root with the training dataset, or --from-feedback with "
            "a decision log"
        )
    if args.category and not args.normal and not args.from_feedback:
        raise ConfigError("--category names the category of the --normal images; pass --normal too")
    check_rate(args.false_alarm_rate)
    tiling = tiling_from(args)
    if tiling is not None and args.save is None:
        raise ConfigError(
            "thresholds for tiled scoring hold for tiled scoring only, so they are not stored beside the model "
            "(whole-image predictions read those): pass --save FILE, then `cnc predict --tile ... --thresholds FILE`"
        )
    images: dict[str | None, list] = {}
    if args.data_root:
        images.update(held_out_by_category(_held_out(args)))
    if args.normal:
        images.setdefault(args.category, []).extend(collect_inputs(args.normal))
    if args.from_feedback:
        confirmed_good = feedback_images(args.from_feedback, category=args.category, skip_bad=args.skip_bad)
        for category, paths in confirmed_good.items():
            images.setdefault(category, []).extend(paths)
    detector = load_detector(args, check_tiling=False)
    found = calibrate_detector(
        detector,
        images,
        args.false_alarm_rate,
        pixel_false_alarm_rate=args.pixel_false_alarm_rate,
        batch_size=args.batch_size,
        workers=args.num_workers,
        skip_bad=args.skip_bad,
        min_images=args.min_images,
    )
    written, stored = store_thresholds(detector, found, replace_labelled=args.replace_f1_max, save_to=args.save)
    kept = sorted({c for c in [*found.categories, ALL] if stored.image[c] != found.image[c]})
    checks = None
    if args.from_feedback:
        checks = check_defects(detector, args.from_feedback, stored, category=args.category, batch_size=args.batch_size)
        good_count = sum(len(paths) for paths in confirmed_good.values())
    if args.json:
        rows = {}
        for category in [*found.categories, ALL]:
            image, pixel = stored.image[category], stored.pixel.get(category)
            rows[category] = {
                "images": image.images,
                "image_threshold": image.value,
                "image_rule": image.rule,
                "pixel_threshold": None if pixel is None else pixel.value,
                "pixel_rule": None if pixel is None else pixel.rule,
            }
        summary = {
            "model": detector.source,
            "thresholds_file": str(written),
            "false_alarm_rate": args.false_alarm_rate,
            "categories": rows,
            "kept_f1_max": kept,
        }
        if checks is not None:
            summary["feedback"] = {
                "folder": args.from_feedback,
                "good_images": good_count,
                "defects": [_check_json(check) for check in checks],
                "defects_flagged": sum(bool(check.flagged) for check in checks),
            }
        emit_json(args, summary)
        return 0
    print("| category | images | image threshold | pixel threshold | rule |")
    print("|---|---:|---:|---:|---|")
    for category in [*found.categories, ALL]:
        image, pixel = stored.image[category], stored.pixel.get(category)
        rule = image.rule if pixel is None or pixel.rule == image.rule else f"{image.rule} / {pixel.rule}"
        name = "(any)" if category == ALL else category
        pixel_value = _number(pixel.value if pixel is not None else None)
        print(f"| {name} | {image.images} | {_number(image.value)} | {pixel_value} | {rule} |")
    if kept:
        print(f"\nkept the F1-max thresholds of `cnc eval` for: {', '.join(kept)} (--replace-f1-max replaces them)")
    if checks is not None:
        _print_checks(args.from_feedback, good_count, checks)
    print(f"\nthresholds: {written}")
    return 0


def _check_json(check: Any) -> dict[str, Any]:
    decision = check.decision
    return {
        "id": decision.id,
        "name": decision.name,
        "category": decision.category,
        "score": check.score,
        "threshold": check.threshold,
        "flagged": check.flagged,
    }


def _print_checks(folder: str, good_count: int, checks: list[Any]) -> None:
    """The parts operators confirmed defective, against the new thresholds."""
    print(f"\nfrom the feedback in {folder}: {good_count} image(s) confirmed good, {len(checks)} confirmed defective")
    if not checks:
        return
    print("| decision | name | category | score | threshold now | flagged now |")
    print("|---|---|---|---:|---:|---|")
    for check in checks:
        flagged = {True: "yes", False: "NO (missed)", None: "unknown"}[check.flagged]
        decision = check.decision
        print(f"| {decision.id} | {decision.name} | {decision.category or '-'} | {_number(check.score)} | "
              f"{_number(check.threshold)} | {flagged} |")  # fmt: skip
    flagged_count = sum(bool(check.flagged) for check in checks)
    print(f"{flagged_count} of {len(checks)} confirmed defects would be flagged with these thresholds")


def _held_out(args: argparse.Namespace) -> list:
    """The good training images of ``--data-root`` that the run of ``--model`` held out (its config's split).

    Raises:
        ConfigError: ``--model`` is an exported graph (its run's split is not known).
        DataError: none were held out.
    """
    from cnc_ad.checkpoint import run_folder_of
    from cnc_ad.config import DataConfig
    from cnc_ad.data import scan_dataset
    from cnc_ad.data.samples import split_calibration
    from cnc_ad.deploy.backends import is_exported
    from cnc_ad.errors import ConfigError, DataError
    from cnc_ad.runs import RunFolder

    if is_exported(args.model):
        raise ConfigError("--data-root needs the run folder or checkpoint (its config says which images it held out)")
    run = RunFolder(run_folder_of(args.model))
    data = run.read_config().data if run.is_run() else DataConfig()
    index = scan_dataset(args.data_root, args.format, data.categories, skip_bad=args.skip_bad)
    _, held = split_calibration(index.train_samples(), data.calibration_share, data.calibration_min)
    if not held:
        raise DataError(
            f"no good training images of {args.data_root} are held out (data.calibration_share="
            f"{data.calibration_share}, categories need 2 x data.calibration_min={data.calibration_min} images); "
            "pass --normal with good images the model was not trained on"
        )
    return held


def _number(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.6g}"
