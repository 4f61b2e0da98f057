"""``cnc ablate``: train and evaluate the ablation grid, over one or more seeds, and print one table."""

from __future__ import annotations

import argparse

from cnc_ad.cli._options import add_device, add_format, add_overrides, add_progress, add_weights

EPILOG = """\
variants: full CNC; without the cross-modal normality constraint (model.use_text=false); without CFD only
(train.lambda_cfd=0: the normality feature stays at its initialisation, NGD still acts); without the gated MoE
(model.use_moe=false); without both (plain multi-layer feature reconstruction); with feature-level normality
promotion at inference (model.fnp=true). With --seeds each variant is trained once per seed and the table gives
mean ± standard deviation.

examples:
  cnc ablate --config demo --data-root demo_out/data --out runs/ablation
  cnc ablate --config offline --data-root .bench/suite --out runs/ablation-real --seeds 0 1 2
  cnc ablate --config mvtec --data-root /data/mvtec_ad --out runs/ablation-mvtec
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ablate",
        help="train and evaluate the ablation grid (with/without cross-modal constraint and MoE)",
        description="Train and evaluate the paper's ablation grid on one dataset and print one table.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML config file or preset name")
    parser.add_argument("--data-root", required=True, help="dataset folder")
    parser.add_argument("--out", default="runs/ablation", help="output folder (default runs/ablation)")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="train every variant once per seed; the table gives mean ± std (default: the config's train.seed, once)",
    )
    add_overrides(parser)
    add_device(parser, note="overrides train.device")
    add_format(parser)
    add_weights(parser)
    add_progress(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cnc_ad.ablate import run_ablation
    from cnc_ad.config import load_config

    overrides = [*args.overrides, f"data.root={args.data_root}"]
    overrides += [f"train.device={args.device}"] if args.device else []
    overrides += [f"data.format={args.format}"] if args.format else []
    config = load_config(args.config, overrides)
    result = run_ablation(
        config,
        args.out,
        clip_weights=args.clip_weights,
        trust_pickle=args.trust_pickle,
        progress=not args.no_progress,
        seeds=args.seeds,
    )
    print(result.table)
    print(f"\nresults: {args.out}/ablation.md")
    return 0
