"""``cnc models``: the model presets with their parameter counts and inference cost."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the model presets (parameters, GFLOPs per image)",
        description="List the model presets with trainable and frozen parameter counts and GFLOPs per image of the "
        "predict path, measured on random weights (no downloads; building ViT-L takes some seconds).",
    )
    parser.add_argument("--json", action="store_true", help='print {"presets": {name: {...}}} as JSON')
    parser.add_argument("--preset", action="append", metavar="NAME", help="only this preset (repeatable)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cnc_ad.errors import ConfigError
    from cnc_ad.model.presets import PRESETS, describe_preset

    names = args.preset or list(PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ConfigError(f"unknown preset {unknown[0]!r}; choose one of {', '.join(PRESETS)}")
    presets = {name: describe_preset(name) for name in names}
    if args.json:
        json.dump({"presets": presets}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    header = f"{'preset':<18} {'image':>5} {'trainable':>12} {'frozen':>12} {'GFLOPs':>9}  description"
    lines = [header, "-" * len(header)]
    for name, info in presets.items():
        lines.append(
            f"{name:<18} {info['image_size']:>5} {info['trainable_params']:>12,} {info['frozen_params']:>12,} "
            f"{info['gflops']:>9.2f}  {PRESETS[name].description}"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
