"""``cnc data``: scan, verify, synthesise and convert datasets."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cnc_ad.data import scan as scan_module
from cnc_ad.data.prepare import export_meta, import_meta, prepare_visa
from cnc_ad.data.samples import DatasetIndex
from cnc_ad.data.synth import CATEGORIES, synthesize

DATA_EPILOG = """\
examples:
  cnc data synth data/synth                       # a synthetic dataset, offline, in seconds
  cnc data scan data/synth --verify               # what a dataset holds; decode every file
  cnc data prepare-visa downloads/VisA data/visa  # raw VisA -> MVTec AD layout, official split
  cnc data export-meta data/mvtec data/mvtec/meta.json
run `cnc data SUBCOMMAND --help` for the options of each.
"""

SCAN_EPILOG = """\
layouts (auto-detected; --format overrides):
  mvtec      <cat>/train/good, <cat>/test/<defect>/, <cat>/ground_truth/<defect>/<stem>_mask.png
             (MVTec AD, MVTec-style VisA, anything in that layout)
  visa-raw   VisA as released: <cat>/Data/Images/{Normal,Anomaly}, <cat>/Data/Masks/Anomaly + split_csv/1cls.csv
  visa       either of the two VisA layouts
  mvtec-ad2  <cat>/train/good, <cat>/validation/good, <cat>/test_public/{good,bad}, test_public/ground_truth/bad
             (test_private* are unlabelled: use them with `cnc predict`)
  realiad    realiad_jsons/<cat>.json with images under realiad_1024/<cat>/ (or realiad_512, ..., or <cat>/)
  folder     <cat>/good/ [<cat>/bad/[<defect>/]] [<cat>/masks/], or one category: --normal DIR [--abnormal DIR]
             [--masks DIR]; masks match images by stem (x.png <-> x.png or x_mask.png); with anomalies, every
             fifth normal image is a test image
  meta       a meta.json index (as used by CLIP anomaly-detection repos), or a folder holding one

examples:
  cnc data scan data/mvtec_anomaly_detection
  cnc data scan data/visa --format visa-raw --verify
  cnc data scan --normal shots/ok --abnormal shots/ng --masks shots/masks --json
  cnc data scan data/mvtec --verify --skip-bad      # log unreadable files instead of stopping
"""

SYNTH_EPILOG = f"""\
Writes a deterministic dataset in the MVTec AD layout (same arguments, same bytes). Categories, in order:
{", ".join(CATEGORIES)} (textures from scikit-image's photographs, procedural objects). Per category: N training
images, ceil(N/4) good test images and ceil(N/8) test images of each of four defect types, with 0/255 masks.

examples:
  cnc data synth data/synth
  cnc data synth data/synth-small --categories 2 --per-category 8 --size 128 --seed 1
  cnc data synth data/synth-all --categories brick,gear,board
"""


def _safe(text: str) -> str:
    """``text`` printable on any terminal (undecodable file-name bytes shown as escapes)."""
    return os.fsencode(text).decode("utf-8", "backslashreplace") if isinstance(text, str) else str(text)


def _scan(args: argparse.Namespace) -> DatasetIndex:
    categories = args.categories.split(",") if getattr(args, "categories", None) else None
    return scan_module.scan_dataset(
        args.root,
        args.format,
        categories,
        normal=args.normal,
        abnormal=args.abnormal,
        masks=args.masks,
        skip_bad=args.skip_bad,
    )


def _print_table(index: DatasetIndex) -> None:
    counts = index.counts()
    header = ("category", "train normal", "test normal", "test anomalous", "masks")
    rows = [(_safe(c), *(str(v) for v in row.values())) for c, row in counts.items()]
    totals = [sum(row[k] for row in counts.values()) for k in ("train_good", "test_good", "test_anomalous", "masks")]
    rows.append(("total", *(str(t) for t in totals)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"format: {index.format}   root: {_safe(str(index.root))}")
    for i, row in enumerate([header, *rows]):
        if i == len(rows):
            print("  ".join("-" * w for w in widths))
        print(
            "  ".join(
                cell.ljust(w) if j == 0 else cell.rjust(w) for j, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def cmd_scan(args: argparse.Namespace) -> int:
    index = _scan(args)
    if args.verify:
        index = scan_module.verify_index(index, skip_bad=args.skip_bad, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps({"format": index.format, "categories": index.counts()}, indent=2))
    else:
        _print_table(index)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    categories: int | list[str] = int(args.categories) if args.categories.isdigit() else args.categories.split(",")
    out = synthesize(
        args.out,
        categories=categories,
        per_category=args.per_category,
        size=args.size,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=sys.stderr.isatty(),
    )
    _print_table(scan_module.scan_dataset(out, "mvtec"))
    return 0


def cmd_prepare_visa(args: argparse.Namespace) -> int:
    _print_table(prepare_visa(args.raw, args.out, progress=sys.stderr.isatty()))
    return 0


def cmd_export_meta(args: argparse.Namespace) -> int:
    path = export_meta(_scan(args), args.out)
    print(f"wrote {_safe(str(path))}")
    return 0


def cmd_import_meta(args: argparse.Namespace) -> int:
    _print_table(import_meta(args.meta, args.out, progress=sys.stderr.isatty()))
    return 0


def _add_source(parser: argparse.ArgumentParser, root_required: bool = False) -> None:
    parser.add_argument("root", nargs=None if root_required else "?", type=Path, help="dataset root folder")
    parser.add_argument("--format", choices=scan_module.FORMATS, help="dataset layout (default: auto-detect)")
    parser.add_argument("--categories", help="comma-separated categories to keep (default: all)")
    parser.add_argument("--normal", type=Path, metavar="DIR", help="folder of normal images (one-category folder)")
    parser.add_argument("--abnormal", type=Path, metavar="DIR", help="folder of anomalous images (with --normal)")
    parser.add_argument("--masks", type=Path, metavar="DIR", help="folder of masks for --abnormal, matched by stem")
    parser.add_argument("--skip-bad", action="store_true", help="log and skip bad files instead of stopping")


def register(subparsers: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = subparsers.add_parser(
        "data",
        help="scan, verify, synthesise and convert datasets",
        description="Scan, verify, synthesise and convert anomaly-detection datasets.",
        epilog=DATA_EPILOG,
        formatter_class=raw,
    )
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", title="subcommands", required=True)

    scan = commands.add_parser(
        "scan",
        help="list what a dataset holds, per category",
        description="Find the images and masks of a dataset and count them per category.",
        epilog=SCAN_EPILOG,
        formatter_class=raw,
    )
    _add_source(scan)
    scan.add_argument("--verify", action="store_true", help="decode every image and mask and check their sizes")
    scan.add_argument("--json", action="store_true", help="print {format, categories: {cat: counts}} as JSON")
    scan.set_defaults(func=cmd_scan)

    synth = commands.add_parser(
        "synth",
        help="write a synthetic multi-class dataset (MVTec AD layout)",
        description="Write a deterministic synthetic anomaly-detection dataset with exact defect masks.",
        epilog=SYNTH_EPILOG,
        formatter_class=raw,
    )
    synth.add_argument("out", type=Path, help="output folder")
    synth.add_argument("--categories", default="4", help=f"how many categories (1-{len(CATEGORIES)}) or their names")
    synth.add_argument("--per-category", type=int, default=40, metavar="N", help="training images per category")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0, help="random seed")
    synth.add_argument("--overwrite", action="store_true", help="replace category folders already in OUT")
    synth.set_defaults(func=cmd_synth)

    visa = commands.add_parser(
        "prepare-visa",
        help="convert the raw VisA release to the MVTec AD layout",
        description="Copy VisA into the MVTec AD layout with the official split (split_csv/1cls.csv); masks are "
        "binarised to 0/255.",
        epilog="example:\n  cnc data prepare-visa downloads/VisA data/visa_pytorch",
        formatter_class=raw,
    )
    visa.add_argument("raw", type=Path, help="the raw VisA folder (holds split_csv/ and the category folders)")
    visa.add_argument("out", type=Path, help="new output folder")
    visa.set_defaults(func=cmd_prepare_visa)

    export = commands.add_parser(
        "export-meta",
        help="write the meta.json index of a dataset",
        description="Write the meta.json index used by CLIP anomaly-detection repos (paths relative to ROOT).",
        epilog="example:\n  cnc data export-meta data/mvtec data/mvtec/meta.json",
        formatter_class=raw,
    )
    _add_source(export)
    export.add_argument("out", type=Path, help="the meta.json file to write")
    export.set_defaults(func=cmd_export_meta)

    imp = commands.add_parser(
        "import-meta",
        help="copy a meta.json-indexed dataset into the MVTec AD layout",
        description="Copy the images listed in a meta.json index (paths relative to its folder) into the MVTec AD "
        "layout, masks binarised to 0/255.",
        epilog="example:\n  cnc data import-meta data/some_dataset/meta.json data/some_dataset_mvtec",
        formatter_class=raw,
    )
    imp.add_argument("meta", type=Path, help="the meta.json file")
    imp.add_argument("out", type=Path, help="new output folder")
    imp.set_defaults(func=cmd_import_meta)
