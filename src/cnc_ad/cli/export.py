"""``cnc export``: the whole inference graph as ONNX or OpenVINO IR, checked against PyTorch."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cnc_ad.cli._options import add_json, add_weights, emit_json

EPILOG = """\
examples:
  cnc export --checkpoint runs/demo --format onnx --out model.onnx
  cnc export --checkpoint runs/mvtec --out model.onnx --data-root /data/mvtec_ad --opset 17
  cnc export --checkpoint runs/demo --format openvino --out model.xml      # writes model.xml and model.bin

The graph takes images (B, 3, S, S) float32 RGB in [0, 1] (S = the model's image size; the graph normalises) and
returns score (B,) and anomaly_map (B, 1, M, M); the batch size is dynamic. The thresholds stored beside the
checkpoint are embedded as metadata, so `cnc predict --model model.onnx` (or model.xml) decides like
`cnc predict --model RUN`, on a station without torch (pip install 'cnc-ad[station]'). The OpenVINO
IR is converted from the same ONNX graph (float32 weights; --fp16 stores float16 weights).

After exporting, the command runs PyTorch and the exported graph (onnxruntime or OpenVINO, float32, on the CPU) on
random images (a batch size other than the traced one, which proves the dynamic batch) and on a few dataset images
with --data-root, prints the largest absolute differences of maps and scores, and exits with status 7 when one
exceeds --tolerance. With --fp16 the parity is printed but not held to --tolerance (float16 weights moved
cnc-effnet-lite0's maps by 6e-4 and its scores by 2e-4 on random images).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model to ONNX or OpenVINO and check parity with PyTorch",
        description="Export the visual inference graph (normalisation, encoder, bottleneck, MoE, decoder, map, blur, "
        "score; text features as constants) to ONNX or OpenVINO IR with a dynamic batch size, then check it against "
        "PyTorch.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    parser.add_argument("--format", choices=["onnx", "openvino"], default="onnx", help="export format (default onnx)")
    parser.add_argument("--out", required=True, metavar="FILE", help="the file to write: FILE.onnx, or FILE.xml")
    parser.add_argument(
        "--fp16", action="store_true", help="openvino: float16 weights; parity is printed, not held to --tolerance"
    )
    parser.add_argument("--data-root", help="also check parity on a few test images of this dataset")
    parser.add_argument("--opset", type=int, help="ONNX opset version (default 17)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed abs difference (default 1e-4)")
    parser.add_argument("--parity-images", type=int, default=4, help="images per parity check (default 4)")
    add_weights(parser)
    add_json(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from cnc_ad.checkpoint import load_model, resolve_checkpoint
    from cnc_ad.data import ImageFileDataset, scan_dataset
    from cnc_ad.deploy.export import DEFAULT_OPSET, check_parity, export_onnx, export_openvino, random_images
    from cnc_ad.errors import ConfigError, DataError, ExportError
    from cnc_ad.thresholds import load_thresholds

    if args.fp16 and args.format != "openvino":
        raise ConfigError("--fp16 applies to --format openvino only")
    checkpoint = resolve_checkpoint(args.checkpoint)
    model = load_model(checkpoint, clip_weights=args.clip_weights, trust_pickle=args.trust_pickle)
    traced = 2
    options: dict[str, Any] = {
        "opset": args.opset or DEFAULT_OPSET,
        "batch_size": traced,
        "thresholds": load_thresholds(checkpoint),
        "checkpoint": checkpoint,
    }
    if args.format == "openvino":
        path = export_openvino(model, args.out, fp16=args.fp16, **options)
    else:
        path = export_onnx(model, args.out, **options)
    checks = {"random": random_images(max(args.parity_images, traced + 1), model.image_size)}
    if args.data_root:
        index = scan_dataset(args.data_root)
        samples = [s for c in index.categories for s in index.test_samples(c)][: args.parity_images]
        dataset = ImageFileDataset([s.image for s in samples], model.image_size)
        decoded = [item["image"] for item in (dataset[i] for i in range(len(dataset))) if not item.get("error")]
        if not decoded:
            raise DataError(f"no readable test image in {args.data_root} for the parity check")
        checks["dataset"] = torch.stack(decoded)
    worst = 0.0
    parities: dict[str, dict[str, float | int]] = {}
    for name, images in checks.items():
        parity = check_parity(model, path, images)
        worst = max(worst, parity["max_abs_map"], parity["max_abs_score"])
        parities[name] = {
            "images": len(images),
            "max_abs_map": parity["max_abs_map"],
            "max_abs_score": parity["max_abs_score"],
        }
        _say(
            args,
            f"parity on {len(images)} {name} images: max |map diff| {parity['max_abs_map']:.3g}, "
            f"max |score diff| {parity['max_abs_score']:.3g}",
        )
    faithful = bool(worst <= args.tolerance)
    files = [str(path)] + ([str(path.with_suffix(".bin"))] if args.format == "openvino" else [])
    emit_json(
        args,
        {
            "format": args.format,
            "out": str(path),
            "files": files,
            "checkpoint": str(checkpoint),
            "fp16": bool(args.fp16),
            "parity": parities,
            "max_abs_diff": worst,
            "tolerance": args.tolerance,
            "within_tolerance": faithful,
        },
    )
    if args.fp16:
        _say(args, f"exported {path} (float16 weights: parity {worst:.3g}, not held to --tolerance {args.tolerance:g})")
        return 0
    if not faithful:
        name = "OpenVINO" if args.format == "openvino" else "ONNX"
        raise ExportError(
            f"{name} parity {worst:.3g} exceeds the tolerance {args.tolerance:g}; {path} is not faithful to the "
            "checkpoint (try another --opset, or report it)"
        )
    _say(args, f"exported {path} (parity within {args.tolerance:g})")
    return 0


def _say(args: argparse.Namespace, line: str) -> None:
    """A result line: on stdout, or on stderr with --json (stdout then holds the JSON object only)."""
    print(line, file=sys.stderr if args.json else sys.stdout)
