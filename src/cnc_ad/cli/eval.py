"""``cnc eval``: per-category and mean metrics of a trained model on a dataset's test split."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
examples:
  cnc eval --checkpoint runs/demo --data-root data/synth
  cnc eval --checkpoint runs/mvtec --data-root /data/mvtec_ad --out runs/mvtec/eval --protocol dinomaly

--checkpoint takes a run folder (its latest checkpoint) or a checkpoint folder. The output folder receives
metrics.json, metrics.csv, thresholds.json, curves.json and the examples that `cnc report` renders. The F1-max
thresholds are also stored beside the checkpoint, where `cnc predict` finds them.
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
    parser.add_argument("--format", help="dataset layout (auto-detected by default)")
    parser.add_argument("--out", help="output folder (default: <run folder>/eval)")
    parser.add_argument("--categories", nargs="+", help="only these categories")
    parser.add_argument("--protocol", choices=["ader", "dinomaly"], help="evaluation protocol (default ader)")
    parser.add_argument("--metrics", choices=["auto", "exact", "streaming"], help="metric computation mode")
    parser.add_argument("--batch-size", type=int, help="images per batch")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--num-workers", type=int, default=2, help="image decoding processes")
    parser.add_argument("--skip-bad", action="store_true", help="log and skip unreadable images instead of stopping")
    parser.add_argument("--clip-weights", metavar="PATH", help="local CLIP weights file (offline use)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow a pickle/TorchScript CLIP weights file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from cnc_ad import distributed as dist
    from cnc_ad.checkpoint import load_model, resolve_checkpoint, run_folder_of
    from cnc_ad.config import EvalConfig
    from cnc_ad.data import scan_dataset
    from cnc_ad.device import resolve_device
    from cnc_ad.evaluate import evaluate, markdown_table, write_results
    from cnc_ad.results import save_thresholds
    from cnc_ad.runs import RunFolder

    device = resolve_device(args.device)
    dist.init_from_env(device)
    checkpoint = resolve_checkpoint(args.checkpoint)
    model = load_model(checkpoint, clip_weights=args.clip_weights, trust_pickle=args.trust_pickle).to(device)
    changes = {
        key: value
        for key, value in {"protocol": args.protocol, "metrics": args.metrics, "batch_size": args.batch_size}.items()
        if value is not None
    }
    config = dataclasses.replace(EvalConfig(), **changes)
    index = scan_dataset(args.data_root, args.format, args.categories, skip_bad=args.skip_bad)
    result = evaluate(
        model,
        index,
        config,
        device=device,
        categories=args.categories,
        num_workers=args.num_workers,
        skip_bad=args.skip_bad,
        progress=not args.no_progress,
    )
    if not dist.is_main_process():
        return 0
    out = Path(args.out) if args.out else RunFolder(run_folder_of(checkpoint)).eval_dir
    write_results(result, out, checkpoint=str(checkpoint))
    save_thresholds(checkpoint, result.thresholds)
    print(markdown_table(result))
    print(f"\nresults: {out}")
    return 0
