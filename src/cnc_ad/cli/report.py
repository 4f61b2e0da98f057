"""``cnc report DIR``: the self-contained HTML report of an evaluation folder (see :mod:`cnc_ad.report`)."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Write one self-contained report.html from an evaluation folder written by `cnc eval --out DIR`: the metric
table (per category and mean, in %), ROC, precision-recall and PRO curves per category, and the most and least
anomalous test images of each category as image | heatmap overlay | predicted mask | ground truth.
Every image is embedded, so the file can be opened, mailed or archived on its own."""

EPILOG = """\
examples:
  cnc eval --checkpoint runs/demo/last --data-root data/synth --out runs/demo/eval
  cnc report runs/demo/eval                          # writes runs/demo/eval/report.html and prints its path
  cnc report runs/demo/eval --out reports/demo.html  # somewhere else
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``report`` subcommand."""
    parser = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report from an evaluation folder",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("eval_dir", metavar="DIR", type=Path, help="evaluation folder written by `cnc eval --out DIR`")
    parser.add_argument(
        "--out", metavar="FILE", type=Path, default=None, help="the HTML file to write (default: DIR/report.html)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Write the report and print its path."""
    from cnc_ad.errors import DataError
    from cnc_ad.report import write_report  # lazy: keeps `cnc --help` free of numpy/Pillow imports
    from cnc_ad.results import is_evaluation_folder

    try:
        print(write_report(args.eval_dir, args.out))
    except DataError as err:
        if is_evaluation_folder(args.eval_dir):
            raise
        raise DataError(
            f"{err}: run `cnc eval --checkpoint CKPT --data-root ROOT --out {args.eval_dir}` first, then "
            f"`cnc report {args.eval_dir}`"
        ) from err
    return 0
