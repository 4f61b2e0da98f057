"""Evaluation (METHOD.md §5): per-category and mean of the seven metrics, thresholds, curves and report examples.

Protocols:
- ``ader`` (default, what CNC's tables follow): maps and masks at 256x256, masks resized bilinearly and binarised at
  0.5, Gaussian sigma 4, the model's own image score.
- ``dinomaly``: images resized to 448/392 of the input and centre-cropped, masks > 0, image score = mean of the top 1 %.

Under ``torchrun`` every process scores its shard of each category and the metric states are merged.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cnc_ad import distributed as dist
from cnc_ad.config import EvalConfig
from cnc_ad.data import DatasetIndex, TestDataset, make_loader
from cnc_ad.errors import ConfigError
from cnc_ad.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from cnc_ad.metrics import (
    METRIC_KEYS,
    MetricAccumulator,
    f1_max_threshold,
    mean_metrics,
)
from cnc_ad.model import CNC
from cnc_ad.model.anomaly_map import image_score

log = logging.getLogger(__name__)

PROTOCOLS = ("ader", "dinomaly")


@dataclass
class CategoryResult:
    """What one category's evaluation keeps besides its metrics (for thresholds, curves and the report)."""

    metrics: dict[str, float]
    image_threshold: float
    pixel_threshold: float
    curves: dict[str, dict[str, list[float]]]
    examples: list[dict[str, Any]] = field(default_factory=list)
    image_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (N,) all processes
    image_labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (N,)


@dataclass
class EvalResult:
    categories: dict[str, dict[str, float]]
    mean: dict[str, float]
    thresholds: dict[str, dict[str, float]]
    left_out: dict[str, list[str]]
    protocol: str
    details: dict[str, CategoryResult] = field(default_factory=dict)

    def to_json(self, checkpoint: str | None = None) -> dict[str, Any]:
        return {
            "categories": self.categories,
            "mean": self.mean,
            "left_out_of_mean": self.left_out,
            "protocol": self.protocol,
            "checkpoint": checkpoint,
        }


def _score_mode(model: CNC, protocol: str) -> str:
    return "top1" if protocol == "dinomaly" else model.config.score


@torch.no_grad()
def evaluate_category(
    model: CNC,
    index: DatasetIndex,
    category: str,
    config: EvalConfig,
    *,
    device: torch.device,
    num_workers: int = 0,
    skip_bad: bool = False,
    examples: int = 3,
    progress: bool = True,
) -> CategoryResult:
    """Score every test image of ``category`` (this process's shard) and compute its metrics."""
    map_size = model.config.map_size
    samples = dist.shard(index.test_samples(category))
    dataset = TestDataset(samples, model.image_size, map_size, protocol=config.protocol)
    loader = make_loader(dataset, config.batch_size, num_workers=num_workers, skip_bad=skip_bad)
    if config.metrics not in ("auto", "exact", "streaming"):
        raise ConfigError(f"eval.metrics={config.metrics!r}; use auto, exact or streaming")
    # 1 - cosine lies in [0, 2]; feature-level normality promotion scales it by up to 1 + theta.
    high = 2.0 * (1.0 + model.config.fnp_theta) if model.config.fnp else 2.0
    accumulator = MetricAccumulator(
        mode=config.metrics,
        bins=config.streaming_bins,
        score_range=(0.0, high),
        max_exact_pixels=config.streaming_above_pixels,
    )
    score_mode = _score_mode(model, config.protocol)
    scores, labels, rows, kept = [], [], [], []
    bar = tqdm(loader, desc=f"eval {category}", unit="batch", leave=False, disable=not progress)
    for batch in bar:
        images = batch["image"].to(device, non_blocking=True)
        prediction = model.predict(images, map_size=map_size)
        maps = prediction.anomaly_map[:, 0].float()
        score = prediction.score if score_mode == model.config.score else image_score(maps[:, None], score_mode)
        score = score.float().cpu().numpy()
        maps = maps.cpu().numpy()
        masks = batch["mask"][:, 0].numpy() > 0.5
        label = batch["label"].numpy().astype(np.int64)
        row = batch["index"].numpy()
        # Anomalous images of a defect type without ground truth count for image metrics only.
        has_mask = np.array([samples[i].mask is not None or samples[i].label == 0 for i in row])
        accumulator.update(score, label, maps[has_mask], masks[has_mask])
        scores.append(score)
        labels.append(label)
        rows.append(row)
        kept.append(maps.astype(np.float16))
    scores_all = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    labels_all = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    maps_all = np.concatenate(kept) if kept else np.zeros((0, map_size, map_size), np.float16)
    rows_all = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return _finish_category(accumulator, samples, scores_all, labels_all, maps_all, rows_all, examples)


def _finish_category(
    accumulator: MetricAccumulator,
    samples: list,
    scores: np.ndarray,
    labels: np.ndarray,
    maps: np.ndarray,
    rows: np.ndarray,
    examples: int,
) -> CategoryResult:
    # Merge the shards of every process (a no-op in a single process).
    states = dist.all_gather_objects(accumulator.state_dict())
    merged = sum(
        (MetricAccumulator.from_state_dict(state) for state in states[1:]), MetricAccumulator.from_state_dict(states[0])
    )
    metrics = merged.compute()
    thresholds = merged.f1_thresholds()
    curves = {
        key: {"x": curve["x"].tolist(), "y": curve["y"].tolist()}
        for key, curve in merged.curves().items()
        if len(curve["x"])
    }
    # Examples: the most and least anomalous images of each process, the best of them chosen on process 0.
    candidates = []
    if len(scores):
        order = np.argsort(-scores, kind="stable")
        chosen = {*order[:examples].tolist(), *order[::-1][:examples].tolist()}
        for i in sorted(chosen):
            sample = samples[rows[i]]
            candidates.append(
                {
                    "image": str(sample.image),
                    "score": float(scores[i]),
                    "label": int(labels[i]),
                    "defect": sample.defect,
                    "mask": str(sample.mask) if sample.mask is not None else None,
                    "map_array": maps[i],
                }
            )
    candidates = [c for part in dist.all_gather_objects(candidates) for c in part]
    candidates.sort(key=lambda c: -c["score"])
    most = candidates[:examples]
    least = [c for c in candidates[::-1][:examples] if c not in most]
    picked = [{**c, "rank": "most"} for c in most] + [{**c, "rank": "least"} for c in least]
    state = merged.state_dict()
    return CategoryResult(
        metrics,
        float(thresholds["image"]),
        float(thresholds["pixel"]),
        curves,
        picked,
        state["image_scores"],
        state["image_labels"],
    )


def evaluate(
    model: CNC,
    index: DatasetIndex,
    config: EvalConfig,
    *,
    device: torch.device,
    categories: list[str] | None = None,
    num_workers: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
) -> EvalResult:
    """Evaluate ``model`` on every test category of ``index`` (or ``categories``)."""
    if config.protocol not in PROTOCOLS:
        raise ConfigError(f"eval.protocol={config.protocol!r}; use {' or '.join(PROTOCOLS)}")
    model.eval()
    categories = categories or index.categories
    unknown = sorted(set(categories) - set(index.categories))
    if unknown:
        raise ConfigError(f"categories {unknown} are not in {index.root}; found: {', '.join(index.categories)}")
    details = {}
    outer = tqdm(categories, desc="evaluating", unit="category", disable=not progress or len(categories) < 2)
    for category in outer:
        details[category] = evaluate_category(
            model,
            index,
            category,
            config,
            device=device,
            num_workers=num_workers,
            skip_bad=skip_bad,
            progress=progress,
        )
    per_category = {cat: detail.metrics for cat, detail in details.items()}
    mean = mean_metrics(per_category)
    left_out = {
        key: [cat for cat, values in per_category.items() if math.isnan(values.get(key, math.nan))]
        for key in METRIC_KEYS
    }
    left_out = {key: cats for key, cats in left_out.items() if cats}
    thresholds = {
        "image": {cat: d.image_threshold for cat, d in details.items()},
        "pixel": {cat: d.pixel_threshold for cat, d in details.items()},
    }
    # For images of unknown category: the F1-max threshold over all test images pooled; for pixels (pooling every
    # pixel of every category would be costly) the median of the category thresholds.
    scores = np.concatenate([d.image_scores for d in details.values()])
    labels = np.concatenate([d.image_labels for d in details.values()])
    pooled = f1_max_threshold(scores, labels)[1] if 0 < labels.sum() < len(labels) else math.nan
    thresholds["image"]["__all__"] = float(pooled)
    finite = [t for t in thresholds["pixel"].values() if math.isfinite(t)]
    thresholds["pixel"]["__all__"] = float(np.median(finite)) if finite else math.nan
    return EvalResult(per_category, mean, thresholds, left_out, config.protocol, details)


def write_results(result: EvalResult, out_dir: str | Path, *, checkpoint: str | None = None) -> Path:
    """Write metrics.json, metrics.csv, thresholds.json, curves.json and the report examples into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", result.to_json(checkpoint))
    atomic_write_text(out / "metrics.csv", metrics_csv(result))
    atomic_write_json(out / "thresholds.json", result.thresholds)
    atomic_write_json(out / "curves.json", {cat: d.curves for cat, d in result.details.items()})
    examples: dict[str, list[dict[str, Any]]] = {}
    (out / "examples").mkdir(exist_ok=True)
    for cat, detail in result.details.items():
        examples[cat] = []
        for k, example in enumerate(detail.examples):
            name = f"examples/{_safe(cat)}_{example['rank']}_{k}.npy"
            buffer = io.BytesIO()
            np.save(buffer, example["map_array"].astype(np.float16))
            atomic_write_bytes(out / name, buffer.getvalue())  # never a half-written map beside examples.json
            entry = {key: value for key, value in example.items() if key != "map_array"}
            examples[cat].append({**entry, "map": name})
    atomic_write_json(out / "examples.json", examples)
    return out


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def metrics_csv(result: EvalResult) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["category", *METRIC_KEYS])
    for cat, values in {**result.categories, "mean": result.mean}.items():
        writer.writerow([cat, *(_fmt(values.get(key, math.nan), 6) for key in METRIC_KEYS)])
    return buffer.getvalue()


def _fmt(value: float, digits: int) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def markdown_table(result: EvalResult) -> str:
    """The metric table in percent, one row per category and the mean, as Markdown."""
    short = ["I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO"]
    lines = ["| category | " + " | ".join(short) + " |", "|---" * (len(short) + 1) + "|"]
    for cat, values in {**result.categories, "**mean**": result.mean}.items():
        cells = ["n/a" if math.isnan(values.get(key, math.nan)) else f"{100 * values[key]:.1f}" for key in METRIC_KEYS]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    for key, cats in result.left_out.items():
        lines.append(f"\n{key}: undefined for {', '.join(cats)} (left out of the mean)")
    return "\n".join(lines)
