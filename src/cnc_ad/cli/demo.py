"""``cnc demo``: the whole job on synthetic data, offline, on a CPU (what ``make demo`` runs)."""

from __future__ import annotations

import argparse

from cnc_ad.cli._options import add_overrides, add_progress

EPILOG = """\
The demo synthesises a multi-class dataset (textures cut from real photographs and procedural parts, with
scratches, holes, stains, pasted patches and missing or extra parts), trains the offline preset
cnc-effnet-lite0 on all categories at once, evaluates every category, and writes report.html.

examples:
  cnc demo                       # into demo_out/
  cnc demo --out /tmp/demo --set train.epochs=2    # a quicker, weaker run
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="synthesise data, train, evaluate and report, offline (a few minutes on a CPU)",
        description="Run the whole job end to end on synthetic data with the offline preset.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--categories", type=int, default=4, help="number of synthetic categories (default 4)")
    parser.add_argument("--per-category", type=int, default=40, help="training images per category (default 40)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data")
    add_overrides(parser, "override a key of configs/demo.yaml")
    add_progress(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cnc_ad.demo import run_demo

    result = run_demo(
        args.out,
        categories=args.categories,
        per_category=args.per_category,
        size=args.size,
        seed=args.seed,
        overrides=tuple(args.overrides),
        progress=not args.no_progress,
    )
    print(result.table)
    timing = ", ".join(f"{name} {value:.0f} s" for name, value in result.seconds.items())
    print(f"\ntime: {timing} (total {sum(result.seconds.values()):.0f} s)")
    print(f"report: {result.report}")
    return 0
