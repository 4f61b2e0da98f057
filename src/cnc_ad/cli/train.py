"""``cnc train``: train one multi-class CNC model over every category of a dataset."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

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
from cnc_ad.errors import ConfigError

EPILOG = """\
examples:
  cnc train --config configs/demo.yaml --data-root data/synth --out runs/demo
  cnc train --config configs/mvtec.yaml --data-root /data/mvtec_ad --out runs/mvtec
  cnc train --config mvtec --data-root /data/mvtec_ad --set train.epochs=100 --set model.use_moe=false
  cnc train --resume runs/mvtec                      # continue from the run's latest checkpoint
  cnc train --config mvtec --data-root /data/mvtec_ad --nproc 4     # 4 GPUs (torchrun underneath)
  torchrun --nproc-per-node 4 -m cnc_ad train --config mvtec --data-root /data/mvtec_ad --out runs/mvtec

The run folder receives config.yaml (the resolved config), log.jsonl (one line per logging step) and
checkpoints/ (a `latest` file names the newest). Config keys: see configs/*.yaml and `cnc_ad.config`.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a model on the normal images of all categories",
        description="Train one CNC model on the normal training images of ALL categories of a dataset at once.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config file or preset name (demo, mvtec, visa, mvtec_ad2)")
    parser.add_argument("--data-root", help="dataset folder (overrides data.root)")
    add_format(parser, note="overrides data.format")
    parser.add_argument("--out", help="run folder (default runs/<config>-<time>)")
    add_overrides(parser, "override a config key, e.g. --set train.lr=1e-4")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    add_device(parser, note="overrides train.device")
    parser.add_argument("--epochs", type=int, help="overrides train.epochs")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimiser steps (train.max_steps)")
    add_weights(parser)
    add_skip_bad(parser)
    parser.add_argument("--nproc", type=int, metavar="N", help="train on N processes/GPUs through torchrun")
    add_progress(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.format:
        overrides.append(f"data.format={args.format}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    if args.skip_bad:
        overrides.append("data.skip_bad=true")
    return overrides


def _relaunch_with_torchrun(args: argparse.Namespace, run_dir: Path) -> int:
    """Run this same command in ``args.nproc`` processes through torchrun, all writing to ``run_dir``."""
    forwarded, skip = [], False
    for item in args.argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            forwarded.append(item)
    if not args.out and not args.resume:
        forwarded += ["--out", str(run_dir)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "cnc_ad", *forwarded]  # fmt: skip
    return subprocess.call(command)


def run(args: argparse.Namespace) -> int:
    from cnc_ad.config import load_config
    from cnc_ad.runs import RunFolder
    from cnc_ad.thresholds import load_thresholds
    from cnc_ad.train import train

    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    default_run_dir = Path(f"runs/{Path(args.config or 'run').stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.nproc and args.nproc > 1 and not under_torchrun:
        return _relaunch_with_torchrun(args, default_run_dir)
    if under_torchrun and not (args.out or args.resume):
        raise ConfigError("under torchrun pass --out RUN_DIR, so that every process writes to the same run folder")
    overrides = _overrides(args)
    if args.resume:
        run = RunFolder(args.resume)
        run_dir = run.path
        if not run.is_run():
            raise ConfigError(
                f"{run_dir} is not a run folder (no {run.config_path.name}); pass the --out folder of a run"
            )
        config = load_config(args.config, overrides) if args.config else run.read_config(overrides)
    else:
        if not args.config:
            raise ConfigError("pass --config FILE (e.g. configs/demo.yaml) or --resume RUN_DIR")
        config = load_config(args.config, overrides)
        run_dir = Path(args.out) if args.out else default_run_dir
    if config.data.root is None:
        raise ConfigError("no training data: pass --data-root DIR (or set data.root in the config)")
    result = train(
        config,
        run_dir,
        resume=bool(args.resume),
        clip_weights=args.clip_weights,
        trust_pickle=args.trust_pickle,
        progress=not args.no_progress,
    )
    from cnc_ad import distributed as dist
    from cnc_ad.deploy.calibrate import calibrate_after_training

    if not dist.is_main_process():
        return 0
    # Thresholds from the good images training held out, beside the final checkpoint.
    calibrate_after_training(result.checkpoint, result.held_out, config, model=result.model)
    if args.json:
        thresholds = load_thresholds(result.checkpoint)
        emit_json(
            args,
            {
                "run_dir": str(result.run_dir),
                "checkpoint": str(result.checkpoint),
                "epochs": result.epochs,
                "steps": result.steps,
                "last_loss": result.last_loss,
                "thresholds": thresholds.to_json() if thresholds is not None else None,
            },
        )
        return 0
    terms = " ".join(f"{k}={v:.4f}" for k, v in result.last_loss.items())
    print(f"trained {result.steps} steps ({result.epochs} epochs): {terms}")
    print(f"checkpoint: {result.checkpoint}")
    return 0
