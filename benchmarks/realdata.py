"""Real-data benchmark: one multi-class model on the development suite, beside a training-free nearest-neighbour
baseline on the same frozen features, in one run.

The suite (``benchmarks/devsuite.py``: DeepPCB, BSData spindles, battery welds, solar cells mono/poly, textiles) is
built once and cached. The model is trained through the same code as ``cnc train`` and evaluated through the same code
as ``cnc eval`` (default protocol). The baseline is PatchCore-style on the model's own frozen encoder: every level's
tokens concatenated on the token grid, ONE memory bank of training tokens for all categories (a seeded random share of
them, ``--knn-bank``; the tokens of exactly the images the model trains on, which leaves out the good images it holds
out to set thresholds), the anomaly of a test token = its Euclidean distance to the nearest bank token, the map
upsampled and smoothed exactly like the model's, image score = max of the map. It is evaluated by the same evaluation
code.

    python benchmarks/realdata.py [--config offline] [--set train.epochs=10] [--seed 0] [--out .bench/runs/NAME]

Per category, the model and the baseline side by side; last line (image figures: mean over the six categories; pixel
figures: mean over the three with masks):
``realdata: image_auroc=<x> image_ap=<x> pixel_auroc=<x> pixel_aupro=<x> knn_image_auroc=<x> knn_image_ap=<x>
knn_pixel_auroc=<x> knn_pixel_aupro=<x> train_s=<x>``
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devsuite import DEFAULT_DEVDATA, build_suite

from cnc_ad.checkpoint import load_model, resolve_checkpoint
from cnc_ad.config import Config, config_from_dict, load_config, parse_overrides
from cnc_ad.data import DatasetIndex, Sample, TrainDataset, make_loader, scan_dataset
from cnc_ad.data.samples import split_calibration
from cnc_ad.device import resolve_device
from cnc_ad.evaluate import INFERENCE_KEYS, EvalResult, evaluate, evaluate_checkpoint, markdown_table
from cnc_ad.feature_cache import ENCODER_FIELDS
from cnc_ad.model import CNC, build_model
from cnc_ad.model.anomaly_map import GaussianBlur, image_score, tokens_to_grid
from cnc_ad.model.cnc import Prediction
from cnc_ad.model.presets import resolve_config
from cnc_ad.runs import RunFolder
from cnc_ad.train import train

log = logging.getLogger("realdata")
ROOT = Path(__file__).resolve().parents[1]
KEYS = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")


class NearestNeighbourBaseline(nn.Module):
    """Training-free PatchCore-style scorer on a detector's frozen encoder, evaluated like the detector.

    Args:
        model: the detector whose encoder, map size, blur and score the baseline shares.
        bank: (N, C) training tokens (every level concatenated on the token grid).
    """

    def __init__(self, model: CNC, bank: Tensor) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.image_size = model.image_size
        self.register_buffer("bank", bank.float())
        self.register_buffer("bank_norm", (bank.float() ** 2).sum(dim=1))
        self.blur = GaussianBlur(model.config.blur_sigma)

    def tokens(self, images: Tensor) -> Tensor:
        return torch.cat(self.model.encode(images), dim=-1).float()  # (B, L, ΣC)

    @torch.no_grad()
    def predict(self, images: Tensor, map_size: int | None = None, score: str | None = None) -> Prediction:
        queries = self.tokens(images)  # (B, L, C)
        flat = queries.flatten(0, 1)  # (B*L, C)
        best = torch.full((flat.shape[0],), math.inf)
        for start in range(0, self.bank.shape[0], 8192):  # ||q||^2 + ||b||^2 - 2 q.b, the bank in chunks
            part = torch.addmm(self.bank_norm[start : start + 8192][None], flat, self.bank[start : start + 8192].T,
                               alpha=-2.0)  # fmt: skip
            best = torch.minimum(best, part.amin(dim=1))
        distance = (best + (flat**2).sum(1)).clamp_min(0).sqrt().view(queries.shape[:2])  # (B, L)
        grid = tokens_to_grid(distance, self.model.grid_size)
        size = map_size or self.config.map_size
        maps = self.blur(F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False))
        return Prediction(image_score(maps, score or self.config.score), maps)


def training_images(config: Config, index: DatasetIndex, all_images: bool = False) -> list[Sample]:
    """The images the model trains on: the training images less those ``data.calibration_share`` holds out to set
    thresholds on (the baseline's bank takes the same ones, so both see the same good images); all of them with
    ``all_images``."""
    samples = index.train_samples()
    if all_images:
        return samples
    return split_calibration(samples, config.data.calibration_share, config.data.calibration_min)[0]


@torch.no_grad()
def memory_bank(model: CNC, samples: list[Sample], size: int, seed: int, workers: int) -> Tensor:
    """A seeded random ``size`` of the tokens of ``samples`` (all tokens when fewer)."""
    loader = make_loader(TrainDataset(samples, model.image_size), 16, num_workers=workers)
    chunks = []
    for batch in tqdm(loader, desc="knn memory bank", unit="batch", leave=False):
        chunks.append(torch.cat(model.encode(batch["image"]), dim=-1).flatten(0, 1).half())
    tokens = torch.cat(chunks)  # (N_images * L, C)
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(tokens.shape[0], generator=generator)[: min(size, tokens.shape[0])]
    return tokens[keep].float()


def summary(result: EvalResult) -> dict[str, float]:
    return {key: result.mean.get(key, math.nan) for key in KEYS}


def side_by_side(model: EvalResult, knn: EvalResult) -> str:
    lines = [
        "| category | I-AUROC | I-AP | P-AUROC | AUPRO | kNN I-AUROC | kNN I-AP | kNN P-AUROC | kNN AUPRO |",
        "|---" * 9 + "|",
    ]

    def cell(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{100 * value:.1f}"

    rows = {**{cat: cat for cat in model.categories}, "mean": "**mean**"}
    for cat, label in rows.items():
        ours = model.mean if cat == "mean" else model.categories[cat]
        theirs = knn.mean if cat == "mean" else knn.categories[cat]
        cells = [cell(ours.get(k, math.nan)) for k in KEYS] + [cell(theirs.get(k, math.nan)) for k in KEYS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def knn_cache_key(config: Config, suite: Path, bank: int, seed: int, all_images: bool) -> str:
    """The baseline depends on the encoder side (resolved from the preset), the map settings and the data only."""
    m = resolve_config(config.model)
    encoder_side = {k: getattr(m, k) for k in (*ENCODER_FIELDS, "preset", "blur_sigma", "map_size", "score")}
    images = "all" if all_images else [config.data.calibration_share, config.data.calibration_min]
    payload = json.dumps(
        {
            "encoder": encoder_side,
            "suite": (suite / "suite.json").read_text(),
            "bank": bank,
            "seed": seed,
            "images": images,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="offline", help="config file or preset name (default: offline)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0, help="train.seed (and the memory bank's sample)")
    parser.add_argument("--suite", default=str(ROOT / ".bench" / "suite"), help="where the suite is (built once)")
    parser.add_argument("--devdata", default=str(DEFAULT_DEVDATA), help="the shared/devdata folder")
    parser.add_argument("--out", help="run folder (default: .bench/runs/<time>)")
    parser.add_argument("--knn-bank", type=int, default=32768, help="memory-bank size in tokens (default 32768)")
    parser.add_argument(
        "--knn-all-images",
        action="store_true",
        help="build the bank from every training image, also those the model holds out to set thresholds on (by "
        "default the bank sees exactly the model's training images)",
    )
    parser.add_argument(
        "--knn-cache",
        action="store_true",
        help="reuse a baseline computed by an earlier run with the same encoder side, data, bank and seed (for lever "
        "studies; without it the baseline is computed afresh)",
    )
    parser.add_argument("--skip-knn", action="store_true", help="model only (lever studies)")
    parser.add_argument("--knn-only", action="store_true", help="the baseline only (e.g. to study the bank size)")
    parser.add_argument("--reuse-run", action="store_true", help="evaluate the run already in --out, no training")
    parser.add_argument(
        "--eval-variants",
        nargs="+",
        default=[],
        metavar="KEY=VALUE[;KEY=VALUE]",
        help="also evaluate the trained model with these inference keys changed (model.score, model.fnp), e.g. "
        "model.score=top1 model.fnp=true",
    )
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    suite = build_suite(args.suite, args.devdata)
    config = load_config(args.config, args.overrides)
    config = config_from_dict({"data": {"root": str(suite)}, "train": {"seed": args.seed}}, config)
    if config.train.cache_dir is None:  # lever studies on the decoder side encode the suite once
        config = config_from_dict({"train": {"cache_dir": str(ROOT / ".bench" / "features")}}, config)
    out = Path(args.out) if args.out else ROOT / ".bench" / "runs" / time.strftime("%Y%m%d-%H%M%S")
    index = scan_dataset(str(suite))
    device = resolve_device(args.device)

    train_s = eval_s = 0.0
    if args.knn_only:
        model = build_model(config.model).to(device).eval()  # the baseline uses its frozen encoder only
        result = None
        ours = {k: math.nan for k in KEYS}
    else:
        start = time.perf_counter()
        checkpoint = resolve_checkpoint(out) if args.reuse_run else train(config, out, index=index).checkpoint
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        result = evaluate_checkpoint(checkpoint, config, device=device, index=index).result  # what `cnc eval` runs
        eval_s = time.perf_counter() - start
        model = load_model(checkpoint).to(device).eval()
        print(markdown_table(result))
        ours = summary(result)
        log_tail = RunFolder(out).read_log()[-1:]
        print(f"\nlast training log line: {json.dumps(log_tail[-1]) if log_tail else '-'}")
        for variant in args.eval_variants:
            changes = config_from_dict(parse_overrides(variant.split(";")), config).model
            if any(getattr(changes, k) != getattr(config.model, k) for k in ("preset", "width", "layers", "backbone")):
                raise SystemExit(f"--eval-variants {variant}: only inference keys (model.score, model.fnp) can change")
            inference = {k: getattr(changes, k) for k in INFERENCE_KEYS}
            model.config = dataclasses.replace(model.config, **inference)
            varied = evaluate(model, index, config.eval, device=device, num_workers=config.data.num_workers)
            print(f"\nvariant {variant}:\n{markdown_table(varied)}")
            print(f"realdata-variant {variant}: " + " ".join(f"{k}={v:.4f}" for k, v in summary(varied).items()))
        model.config = dataclasses.replace(model.config, **{k: getattr(config.model, k) for k in INFERENCE_KEYS})

    knn = {f"knn_{k}": math.nan for k in KEYS}
    knn_s = 0.0
    if not args.skip_knn:
        key = knn_cache_key(config, suite, args.knn_bank, args.seed, args.knn_all_images)
        cache = ROOT / ".bench" / "knn" / f"{key}.json"
        if args.knn_cache and cache.is_file():
            knn = json.loads(cache.read_text())["summary"]
            print(f"\nnearest-neighbour baseline reused from {cache}")
        else:
            start = time.perf_counter()
            trained = RunFolder(out).read_config() if args.reuse_run else config  # the split the model was trained with
            images = training_images(trained, index, args.knn_all_images)
            bank = memory_bank(model, images, args.knn_bank, args.seed, config.data.num_workers)
            baseline = NearestNeighbourBaseline(model, bank).to(device).eval()
            knn_result = evaluate(baseline, index, config.eval, device=device, num_workers=config.data.num_workers)
            knn_s = time.perf_counter() - start
            knn = {f"knn_{k}": v for k, v in summary(knn_result).items()}
            if result is not None:
                print("\nmodel (left) and nearest-neighbour baseline (right), same encoder, same evaluation:\n")
                print(side_by_side(result, knn_result))
            else:
                print(markdown_table(knn_result))
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"summary": knn, "categories": knn_result.categories}))
    print(f"\nrun folder: {out}  (train {train_s:.0f} s, eval {eval_s:.0f} s, knn {knn_s:.0f} s)")
    figures = {**ours, **knn}
    print("realdata: " + " ".join(f"{k}={v:.4f}" for k, v in figures.items()) + f" train_s={train_s:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
