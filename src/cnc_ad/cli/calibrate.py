"""``cnc calibrate``: set decision thresholds from good images only, at a chosen false-alarm rate (a checkpoint or an
exported model; :mod:`cnc_ad.deploy.calibrate` does the work).
"""

from __future__ import annotations

import argparse
import math

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
    parser.add_argument("--category", help="the category of the --normal images (default: none; shared threshold)")
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
    from cnc_ad.deploy.calibrate import calibrate_detector, check_rate, store_thresholds
    from cnc_ad.deploy.predict import collect_inputs
    from cnc_ad.errors import ConfigError
    from cnc_ad.thresholds import ALL

    if not args.normal and not args.data_root:
        raise ConfigError("pass --normal with folders of good images, or --data-root with the training dataset")
    if args.category and not args.normal:
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
        emit_json(
            args,
            {
                "model": detector.source,
                "thresholds_file": str(written),
                "false_alarm_rate": args.false_alarm_rate,
                "categories": rows,
                "kept_f1_max": kept,
            },
        )
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
    print(f"\nthresholds: {written}")
    return 0


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
