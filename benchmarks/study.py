"""Where the model's map and the nearest-neighbour baseline's map fire, on the masked categories of the suite.

For a trained run (``benchmarks/realdata.py --out RUN``) and the baseline on the same frozen encoder
(:class:`realdata.NearestNeighbourBaseline`), on each category with masks:

- a montage (``--pictures DIR``): defective and good test images, their ground truth, the model's map and the baseline's
  map, each map coloured on its own category's scale (0 at the median of its good test images' pixels, full colour at
  their 99.9th percentile), so that what lights up in each can be compared;
- diagnostics, printed as tables: pixel AUROC and AUPRO of the model, of the baseline and of each decoder level alone;
  at the pixel threshold where 1 % of the category's normal pixels fire (per method), the false-positive rate in the
  border band (one token wide) against the interior, on good images against the normal pixels of defective images, and
  the share of each defect region's pixels found, by region size (small < 0.5 % of the image, medium < 5 %, large).

With ``--normalise``, each category's maps are also read against its held-out good training images (the share that
training keeps aside for thresholds; neither the model nor the bank saw them), three post-processings of the study's
findings, shown beside the plain model and the baseline: the model's map less the per-pixel mean of the held-out maps (a
fixed pattern, such as the borders, cancels), the same divided by their per-pixel spread (floored at its median), and a
fused map, the model's and the baseline's maps each standardised by their held-out pixels' mean and spread, summed.
``--map-levels 0 1`` evaluates a run trained before ``model.map_levels`` was in its config as if it were.

    python benchmarks/study.py --run .bench/runs/NAME [--pictures docs/images/study] [--knn-bank 32768]
    python benchmarks/study.py --run .bench/runs/NAME --normalise --map-levels 0 1 --seed 1
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from devsuite import DEFAULT_DEVDATA, build_suite
from realdata import ROOT, NearestNeighbourBaseline, memory_bank, training_images

from cnc_ad.checkpoint import load_model, resolve_checkpoint
from cnc_ad.data import TestDataset, make_loader, scan_dataset
from cnc_ad.data.samples import split_calibration
from cnc_ad.metrics import aupro, compute_metrics
from cnc_ad.model.anomaly_map import discrepancy, tokens_to_grid
from cnc_ad.runs import RunFolder
from cnc_ad.visualize import colorize, to_jpeg_bytes

SIZE = 256  # the evaluation map size (ADer protocol)
FPR = 0.01
SIZES = (("small", 0.005), ("medium", 0.05), ("large", 1.0))  # defect region area as a share of the image


@torch.no_grad()
def collect(model, baseline, samples, workers: int) -> dict[str, np.ndarray]:
    """Images (N, 64, 64, 3) uint8 thumbnails for the montage, masks, labels, the model's map, the baseline's map
    and each decoder level's map (N, 256, 256), all smoothed and sized as the evaluation does."""
    loader = make_loader(TestDataset(samples, model.image_size, SIZE), 16, num_workers=workers)
    out: dict[str, list] = {"image": [], "mask": [], "label": [], "model": [], "knn": []}
    for batch in loader:
        images = batch["image"]
        output = model(model.encode(images))
        out["model"].append(model.maps_from_output(output, SIZE)[:, 0].half().numpy())
        for level, (e, d) in enumerate(zip(output.encoder, output.decoder, strict=True)):
            grid = tokens_to_grid(discrepancy(e, d), model.grid_size)
            level_map = model.blur(F.interpolate(grid.float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False))
            out.setdefault(f"level{level}", []).append(level_map[:, 0].half().numpy())
        out["knn"].append(baseline.predict(images, SIZE).anomaly_map[:, 0].half().numpy())
        thumbs = F.interpolate(images, size=(128, 128), mode="bilinear", antialias=True)
        out["image"].append((thumbs.permute(0, 2, 3, 1) * 255).round().byte().numpy())
        out["mask"].append(batch["mask"][:, 0].bool().numpy())
        out["label"].append(batch["label"].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def threshold_at(maps: np.ndarray, masks: np.ndarray, fpr: float) -> float:
    """The value above which a share ``fpr`` of the normal pixels lie."""
    return float(np.quantile(maps[~masks].astype(np.float32), 1.0 - fpr))


def border_band(size: int, width: int) -> np.ndarray:
    band = np.zeros((size, size), bool)
    band[:width], band[-width:], band[:, :width], band[:, -width:] = True, True, True, True
    return band


def diagnostics(data: dict[str, np.ndarray], method: str, token_px: int) -> dict[str, float]:
    maps, masks, labels = data[method].astype(np.float32), data["mask"], data["label"]
    scores = maps.reshape(len(maps), -1).max(1)
    found = compute_metrics(scores, labels, maps, masks)
    t = threshold_at(maps, masks, FPR)
    fires = maps >= t
    band = np.broadcast_to(border_band(SIZE, token_px), maps.shape)
    normal = ~masks
    good = np.broadcast_to((labels == 0)[:, None, None], maps.shape)
    row = {
        "P-AUROC": found["pixel_auroc"],
        "AUPRO": found["pixel_aupro"],
        "FPR border": float(fires[normal & band].mean()),
        "FPR interior": float(fires[normal & ~band].mean()),
        "FPR good imgs": float(fires[normal & good].mean()),
        "FPR defect imgs": float(fires[normal & ~good].mean()),
    }
    found_by_size: dict[str, list[float]] = {name: [] for name, _ in SIZES}
    for mask, fire in zip(masks, fires, strict=True):
        regions, count = ndimage.label(mask, structure=np.ones((3, 3)))
        for k in range(1, count + 1):
            region = regions == k
            share = region.mean()
            name = next(n for n, limit in SIZES if share < limit)
            found_by_size[name].append(float(fire[region].mean()))
    for name, values in found_by_size.items():
        row[f"found {name} (n)"] = (float(np.mean(values)) if values else math.nan, len(values))
    return row


def normalised(data: dict[str, np.ndarray], good: dict[str, np.ndarray], token_px: int) -> dict[str, dict]:
    """The rows of ``--normalise``: the test maps of ``data`` read against the held-out good maps of ``good``."""
    model, held = data["model"].astype(np.float32), good["model"].astype(np.float32)
    mean, spread = held.mean(0), held.std(0)
    spread = np.maximum(spread, float(np.median(spread)))

    def standard(maps: np.ndarray, reference: np.ndarray) -> np.ndarray:
        return (maps.astype(np.float32) - reference.mean()) / reference.std()

    variants = {
        "model - held-out mean": model - mean,
        "model, z per pixel": (model - mean) / spread,
        "fused (model z + kNN z)": standard(model, held) + standard(data["knn"], good["knn"].astype(np.float32)),
    }
    return {name: diagnostics({**data, name: maps}, name, token_px) for name, maps in variants.items()}


def montage(data: dict[str, np.ndarray], path: Path, rows: int = 6) -> None:
    """Defective images (the first ``rows - 2`` in test order, spread out) and 2 good ones: image | truth | model |
    baseline, each map on its own category scale."""
    bad = np.flatnonzero(data["label"] == 1)
    good = np.flatnonzero(data["label"] == 0)
    picks = [
        *bad[np.linspace(0, len(bad) - 1, rows - 2).astype(int)],
        *good[np.linspace(0, len(good) - 1, 2).astype(int)],
    ]
    tiles = []
    scale = {}
    for method in ("model", "knn"):
        normal = data[method][data["label"] == 0].astype(np.float32)
        scale[method] = (float(np.median(normal)), float(np.quantile(normal, 0.999)))
    for i in picks:
        image = np.asarray(Image.fromarray(data["image"][i]).resize((128, 128)))
        truth = np.repeat((data["mask"][i] * 255).astype(np.uint8)[..., None], 3, axis=2)
        truth = np.asarray(Image.fromarray(truth).resize((128, 128)))
        cells = [image, truth]
        for method in ("model", "knn"):
            low, high = scale[method]
            heat = colorize(data[method][i].astype(np.float32), vmin=low, vmax=high)
            cells.append(np.asarray(Image.fromarray(heat).resize((128, 128))))
        tiles.append(np.concatenate([np.pad(c, ((2, 2), (2, 2), (0, 0)), constant_values=255) for c in cells], 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(to_jpeg_bytes(np.concatenate(tiles, 0), quality=82))


def table(rows: dict[str, dict[str, float]]) -> str:
    keys = list(next(iter(rows.values())))
    lines = ["| | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, row in rows.items():
        cells = []
        for key in keys:
            value = row[key]
            if isinstance(value, tuple):
                cells.append("n/a" if math.isnan(value[0]) else f"{100 * value[0]:.1f} ({value[1]})")
            else:
                cells.append(f"{100 * value:.1f}" if key.startswith(("P-", "AU")) else f"{100 * value:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run folder of benchmarks/realdata.py")
    parser.add_argument("--suite", default=str(ROOT / ".bench" / "suite"))
    parser.add_argument("--devdata", default=str(DEFAULT_DEVDATA))
    parser.add_argument("--pictures", help="write a montage per masked category into this folder")
    parser.add_argument("--knn-bank", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0, help="the memory bank's sample (as realdata.py --seed)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--normalise", action="store_true", help="also the maps read against held-out good images")
    parser.add_argument("--map-levels", type=int, nargs="+", help="override the run's model.map_levels")
    args = parser.parse_args(argv)

    suite = build_suite(args.suite, args.devdata)
    index = scan_dataset(str(suite))
    model = load_model(resolve_checkpoint(args.run)).eval()
    if args.map_levels:
        model.config = dataclasses.replace(model.config, map_levels=tuple(args.map_levels))
    config = RunFolder(args.run).read_config()
    images = training_images(config, index)  # the images the model trained on
    _, held_out = split_calibration(index.train_samples(), config.data.calibration_share, config.data.calibration_min)
    bank = memory_bank(model, images, args.knn_bank, args.seed, args.workers)
    baseline = NearestNeighbourBaseline(model, bank).eval()
    token_px = SIZE // model.grid_size
    for category in index.categories:
        samples = index.test_samples(category)
        if not any(s.mask is not None for s in samples):
            continue
        data = collect(model, baseline, samples, args.workers)
        rows = {"model": diagnostics(data, "model", token_px), "baseline (kNN)": diagnostics(data, "knn", token_px)}
        if args.normalise:
            good = collect(model, baseline, [s for s in held_out if s.category == category], args.workers)
            rows.update(normalised(data, good, token_px))
        levels = sorted(k for k in data if k.startswith("level"))
        for level in levels:
            masks = data["mask"]
            maps = data[level].astype(np.float32)
            rows[f"model, {level} alone"] = {"P-AUROC": float(
                compute_metrics(maps.reshape(len(maps), -1).max(1), data["label"], maps, masks)["pixel_auroc"]
            ), "AUPRO": aupro(maps, masks)}  # fmt: skip
        train_count = len([s for s in index.train_samples() if s.category == category])
        print(f"\n### {category} ({train_count} training images, {len(samples)} test images)\n")
        print(table({k: v for k, v in rows.items() if "alone" not in k}))
        print()
        print(table({k: v for k, v in rows.items() if "alone" in k}))
        if args.pictures:
            montage(data, Path(args.pictures) / f"{category}.jpg")
    return 0


if __name__ == "__main__":
    sys.exit(main())
