"""``cnc ablate``: train and evaluate the ablation grid, over one or more seeds, and print one table."""

from __future__ import annotations

import argparse

from cnc_ad.cli._options import add_device, add_format, add_overrides, add_progress, add_weights

EPILOG = """\
variants (--variants keys):
  full      the full CNC model
  no-text   without the cross-modal normality constraint (model.use_text=false)
  no-cfd    without CFD only (train.lambda_cfd=0: the normality feature stays at its initialisation, NGD still acts)
  no-moe    without the gated MoE (model.use_moe=false)
  plain     without both (plain multi-layer feature reconstruction)
  fnp       with feature-level normality promotion (model.fnp=true): FNP acts at inference only, so this row
            evaluates the full model's checkpoint with it (into fnp/) instead of training the same model again
With --seeds each variant is trained once per seed (folders <key>/seed<k>) and the table gives mean ± standard
deviation.

Stopping and running again: a run folder under --out that holds a finished evaluation of the same config is read
back, an interrupted training is resumed, and a folder that holds another config is refused (exit 2). So a long grid
can be split over processes or machines sharing --out (--variants), then gathered by one call over all variants;
--collect prints what is finished so far and trains nothing.

examples:
  cnc ablate --config demo --data-root demo_out/data --out runs/ablation
  cnc ablate --config offline --data-root .bench/suite --out runs/ablation-real --seeds 0 1 2
  cnc ablate --config offline --data-root .bench/suite --out runs/ablation-real --seeds 0 1 2 --variants no-text plain
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
    parser.add_argument(
        "--variants",
        nargs="+",
        metavar="KEY",
        help="train only these rows of the grid (default all: full no-text no-cfd no-moe plain fnp)",
    )
    parser.add_argument(
        "--collect",
        action="store_true",
        help="train nothing: print the table of the runs already finished under --out and list the missing ones",
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
        variants=args.variants,
        collect_only=args.collect,
    )
    print(result.table)
    if result.missing:
        print(f"\nnot finished yet ({len(result.missing)}): " + ", ".join(result.missing))
    print(f"\nresults: {args.out}/ablation.md ({result.trained} runs trained by this call, the others read back)")
    return 0
