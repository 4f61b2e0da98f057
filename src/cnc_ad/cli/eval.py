"""``cnc eval``: per-category and mean metrics of a trained model on a dataset's test split."""

from __future__ import annotations

import argparse
import json

from cnc_ad.cli._options import (
    add_device,
    add_format,
    add_json,
    add_overrides,
    add_progress,
    add_skip_bad,
    add_weights,
    emit_json,
)

EPILOG = """\
examples:
  cnc eval --checkpoint runs/demo --data-root data/synth
  cnc eval --checkpoint runs/mvtec --data-root /data/mvtec_ad --out runs/mvtec/eval --protocol dinomaly

--checkpoint takes a run folder (its latest checkpoint) or a checkpoint folder. The evaluation settings are the
run's own (its config.yaml, eval: group), then --set group.key=value, then the flags below. The output folder receives
metrics.json, metrics.csv, thresholds.json, curves.json and the examples that `cnc report` renders. The F1-max
thresholds are also stored beside the checkpoint, where `cnc predict` finds them (they replace thresholds set by
`cnc calibrate` or by training on held-out good images, which are kept for categories without an F1-max value).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model: the seven metrics per category and their mean",
        description="Evaluate a trained model on the test split of every category: image AUROC/AP/F1-max, pixel "
        "AUROC/AP/F1-max and AUPRO, per category and mean.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    parser.add_argument("--data-root", required=True, help="dataset folder")
    add_format(parser)
    parser.add_argument("--out", help="output folder (default: <run folder>/eval)")
    parser.add_argument("--categories", nargs="+", help="only these categories")
    add_overrides(parser, "override a key of the run's config, e.g. --set eval.batch_size=32")
    parser.add_argument("--protocol", choices=["ader", "dinomaly"], help="evaluation protocol (default: the run's)")
    parser.add_argument("--metrics", choices=["auto", "exact", "streaming"], help="metric computation mode")
    parser.add_argument("--batch-size", type=int, help="images per batch")
    add_device(parser, default="auto")
    parser.add_argument("--num-workers", type=int, help="image decoding processes (default: data.num_workers)")
    add_skip_bad(parser)
    add_weights(parser)
    add_progress(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> list[str]:
    """The flags as ``group.key=value`` overrides, on top of ``--set`` (flags win)."""
    overrides = [*args.overrides, f"data.root={args.data_root}"]
    flags = {
        "data.format": args.format,
        "data.categories": "[" + ", ".join(json.dumps(c) for c in args.categories) + "]" if args.categories else None,
        "data.num_workers": args.num_workers,
        "eval.protocol": args.protocol,
        "eval.metrics": args.metrics,
        "eval.batch_size": args.batch_size,
    }
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    if args.skip_bad:
        overrides.append("data.skip_bad=true")
    return overrides


def run(args: argparse.Namespace) -> int:
    from cnc_ad import distributed as dist
    from cnc_ad.evaluate import evaluate_checkpoint, markdown_table, run_config

    done = evaluate_checkpoint(
        args.checkpoint,
        run_config(args.checkpoint, _overrides(args)),
        out_dir=args.out,
        device=args.device,
        clip_weights=args.clip_weights,
        trust_pickle=args.trust_pickle,
        progress=not args.no_progress,
    )
    if not dist.is_main_process():
        return 0
    if args.json:
        emit_json(
            args,
            {
                "checkpoint": str(done.checkpoint),
                "out": str(done.out_dir),
                "thresholds_file": None if done.thresholds_file is None else str(done.thresholds_file),
                "mean": done.result.mean,
                "categories": done.result.categories,
                "left_out_of_mean": done.result.left_out,
                "thresholds": done.result.thresholds.to_json(),
            },
        )
        return 0
    print(markdown_table(done.result))
    print(f"\nresults: {done.out_dir}")
    return 0
