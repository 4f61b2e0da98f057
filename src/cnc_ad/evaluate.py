"""Evaluation (docs/method.md, Evaluation): per-category and mean of the seven metrics, thresholds, curves and report
examples.

Protocols:
- ``ader`` (default, what CNC's tables follow): maps and masks at 256x256, masks resized bilinearly and binarised at
  0.5, Gaussian sigma 4, the model's own image score.
- ``dinomaly``: images resized to 448/392 of the input and centre-cropped, masks > 0, image score = mean of the top 1 %.

Under ``torchrun`` every process scores its shard of each category and the metric states are merged.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnc_ad import distributed as dist
from cnc_ad.checkpoint import run_folder_of
from cnc_ad.config import Config, EvalConfig, load_config
from cnc_ad.data import DatasetIndex, TestDataset, make_loader, scan_dataset
from cnc_ad.errors import ConfigError
from cnc_ad.metrics import (
    METRIC_KEYS,
    METRIC_LABELS,
    MetricAccumulator,
    f1_max_threshold,
    mean_metrics,
)
from cnc_ad.model import CNC
from cnc_ad.model.presets import resolve_config
from cnc_ad.progress import progress_bar
from cnc_ad.results import Example, write_evaluation
from cnc_ad.runs import RunFolder
from cnc_ad.thresholds import ALL, Threshold, Thresholds, thresholds_path, update_thresholds

# Model keys that act at inference only: an evaluation may change them on a trained checkpoint.
INFERENCE_KEYS = ("score", "fnp", "fnp_theta", "blur_sigma", "map_levels", "score_levels")

log = logging.getLogger(__name__)


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
    pixel_images: int = 0  # images whose pixels were scored (normal ones, and anomalous ones with a mask)

    @property
    def thresholds(self) -> dict[str, Threshold]:
        """This category's F1-max thresholds by kind, with the number of images behind each."""
        return {
            "image": Threshold(self.image_threshold, "f1_max", len(self.image_scores)),
            "pixel": Threshold(self.pixel_threshold, "f1_max", self.pixel_images),
        }


@dataclass
class EvalResult:
    """Metrics per category and their mean, the thresholds found, and what the report needs per category."""

    categories: dict[str, dict[str, float]]
    mean: dict[str, float]
    thresholds: Thresholds
    left_out: dict[str, list[str]]  # metric -> categories where it is undefined (left out of the mean)
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
    pixel_images = 0
    bar = progress_bar(loader, desc=f"eval {category}", unit="batch", leave=False, enabled=progress)
    for batch in bar:
        images = batch["image"].to(device, non_blocking=True)
        prediction = model.predict(images, map_size=map_size, score=score_mode)
        map_tensor = prediction.anomaly_map[:, 0].float()
        score = prediction.score.float().cpu().numpy()
        maps = map_tensor.cpu().numpy()
        masks = batch["mask"][:, 0].numpy() > 0.5
        label = batch["label"].numpy().astype(np.int64)
        row = batch["index"].numpy()
        # Anomalous images of a defect type without ground truth count for image metrics only.
        has_mask = np.array([samples[i].mask is not None or samples[i].label == 0 for i in row])
        accumulator.update(score, label, maps[has_mask], masks[has_mask])
        pixel_images += int(has_mask.sum())
        scores.append(score)
        labels.append(label)
        rows.append(row)
        kept.append(maps.astype(np.float16))
    scores_all = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    labels_all = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    maps_all = np.concatenate(kept) if kept else np.zeros((0, map_size, map_size), np.float16)
    rows_all = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    result = _finish_category(accumulator, samples, scores_all, labels_all, maps_all, rows_all, examples)
    result.pixel_images = int(sum(dist.all_gather_objects(pixel_images)))
    return result


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
    model.eval()
    categories = categories or index.categories
    unknown = sorted(set(categories) - set(index.categories))
    if unknown:
        raise ConfigError(f"categories {unknown} are not in {index.root}; found: {', '.join(index.categories)}")
    details = {}
    outer = progress_bar(categories, desc="evaluating", unit="category", enabled=progress and len(categories) > 1)
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
    return summarize(details, config.protocol)


def summarize(details: dict[str, CategoryResult], protocol: str) -> EvalResult:
    """The mean of each metric over the categories where it is defined (the others are listed as left out of it),
    and the thresholds of every category plus the shared ones (:func:`pool_thresholds`).
    """
    per_category = {cat: detail.metrics for cat, detail in details.items()}
    left_out = {
        key: [cat for cat, values in per_category.items() if math.isnan(values.get(key, math.nan))]
        for key in METRIC_KEYS
    }
    left_out = {key: cats for key, cats in left_out.items() if cats}
    return EvalResult(per_category, mean_metrics(per_category), pool_thresholds(details), left_out, protocol, details)


def pool_thresholds(details: dict[str, CategoryResult]) -> Thresholds:
    """Every category's thresholds, plus shared ones (key ``__all__``) for images of any category.

    The shared image threshold is the F1-max one over the test images of all categories pooled (NaN unless both
    labels occur); the shared pixel threshold (pooling every pixel of every category would be costly) is the median of
    the finite category thresholds.
    """
    image = {cat: d.thresholds["image"] for cat, d in details.items()}
    pixel = {cat: d.thresholds["pixel"] for cat, d in details.items()}
    scores = np.concatenate([d.image_scores for d in details.values()]) if details else np.zeros(0, np.float32)
    labels = np.concatenate([d.image_labels for d in details.values()]) if details else np.zeros(0, np.int64)
    pooled = f1_max_threshold(scores, labels)[1] if 0 < labels.sum() < len(labels) else math.nan
    image[ALL] = Threshold(float(pooled), "f1_max_pooled", len(labels))
    finite = [t.value for t in pixel.values() if t.is_finite]
    median = float(np.median(finite)) if finite else math.nan
    pixel[ALL] = Threshold(median, "median", sum(d.pixel_images for d in details.values()))
    return Thresholds(image=image, pixel=pixel)


def write_results(result: EvalResult, out_dir: str | Path, *, checkpoint: str | None = None) -> Path:
    """Write the evaluation folder of ``result`` (metrics, thresholds, curves, report examples) into ``out_dir``."""
    return write_evaluation(
        out_dir,
        metrics=result.to_json(checkpoint),
        thresholds=result.thresholds,
        curves={cat: d.curves for cat, d in result.details.items()},
        examples={cat: [_example(e) for e in d.examples] for cat, d in result.details.items()},
    )


def _example(entry: dict[str, Any]) -> Example:
    return Example(
        image=entry["image"],
        score=entry["score"],
        label=entry["label"],
        defect=entry["defect"],
        mask=entry["mask"],
        rank=entry["rank"],
        anomaly_map=entry["map_array"],
    )


def markdown_table(result: EvalResult) -> str:
    """The metric table in percent, one row per category and the mean, as Markdown."""
    short = [METRIC_LABELS[key] for key in METRIC_KEYS]
    lines = ["| category | " + " | ".join(short) + " |", "|---" * (len(short) + 1) + "|"]
    for cat, values in {**result.categories, "**mean**": result.mean}.items():
        cells = ["n/a" if math.isnan(values.get(key, math.nan)) else f"{100 * values[key]:.1f}" for key in METRIC_KEYS]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    for key, cats in result.left_out.items():
        lines.append(f"\n{key}: undefined for {', '.join(cats)} (left out of the mean)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- the pipeline
@dataclass(frozen=True)
class CheckpointEvaluation:
    """What :func:`evaluate_checkpoint` did: the metrics and thresholds, the checkpoint, where the files went."""

    result: EvalResult
    checkpoint: Path
    out_dir: Path | None  # None on processes other than the main one (which alone writes)
    thresholds_file: Path | None


def run_config(checkpoint: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The config a checkpoint is evaluated with: its run folder's config (defaults for a loose checkpoint) with
    ``group.key=value`` overrides on top.

    Raises:
        CheckpointError: no checkpoint there.
        ConfigError: the run's config or an override is invalid.
    """
    run = RunFolder(run_folder_of(checkpoint))
    return run.read_config(overrides) if run.is_run() else load_config(None, overrides)


def evaluate_checkpoint(
    checkpoint: str | Path,
    config: Config,
    *,
    out_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    index: DatasetIndex | None = None,
    clip_weights: str | None = None,
    trust_pickle: bool = False,
    pretrained: bool = True,
    progress: bool = True,
    inference: Mapping[str, Any] | None = None,
    store_thresholds: bool = True,
) -> CheckpointEvaluation:
    """Evaluate a checkpoint on a dataset's test split, write the evaluation folder and store the thresholds.

    The one evaluation pipeline (``cnc eval``, the demo and the ablation grid call it): load the model, score every
    test category (sharded under ``torchrun``), then on the main process write the evaluation folder
    (:mod:`cnc_ad.results`) and store the thresholds beside the checkpoint, where prediction finds them.

    Args:
        checkpoint: checkpoint folder, run folder or ``RUN/last``.
        config: ``eval`` is the protocol; ``data`` names the dataset (root, format, categories, skip_bad, num_workers);
            see :func:`run_config` for the run's own.
        out_dir: the evaluation folder (default: the run folder's ``eval/``).
        device: ``"auto"`` or a torch device.
        index: the dataset, already scanned (default: scan ``config.data``).
        clip_weights: local CLIP weights file.
        trust_pickle: allow a pickle / TorchScript ``clip_weights`` file.
        pretrained: False builds the model's random backbone (tests).
        progress: show progress bars.
        inference: model keys that act at inference only (:data:`INFERENCE_KEYS`), changed for this evaluation,
            e.g. ``{"fnp": True}``; the checkpoint is not changed.
        store_thresholds: store the F1-max thresholds beside the checkpoint (False: in the evaluation folder only;
            an evaluation with ``inference`` changes should not replace the model's own).

    Raises:
        CheckpointError: no usable checkpoint.
        ConfigError: no dataset, or categories that it does not hold.
        DataError: unreadable test images (unless ``config.data.skip_bad``).
    """
    from cnc_ad.checkpoint import load_model, resolve_checkpoint
    from cnc_ad.device import resolve_device

    device = resolve_device(device) if isinstance(device, str) else device
    dist.init_from_env(device)
    folder = resolve_checkpoint(checkpoint)
    model = load_model(folder, clip_weights=clip_weights, trust_pickle=trust_pickle, pretrained=pretrained).to(device)
    if inference:
        other = sorted(set(inference) - set(INFERENCE_KEYS))
        if other:
            changeable = ", ".join(f"model.{key}" for key in INFERENCE_KEYS)
            raise ConfigError(f"model.{', model.'.join(other)} act in training; an evaluation can change {changeable}")
        model.config = resolve_config(dataclasses.replace(model.config, **inference))
    data = config.data
    if index is None:
        if data.root is None:
            raise ConfigError("no test data: set data.root to the dataset folder")
        index = scan_dataset(data.root, data.format, data.categories, skip_bad=data.skip_bad)
    result = evaluate(
        model,
        index,
        config.eval,
        device=device,
        categories=list(data.categories) if data.categories else None,
        num_workers=data.num_workers,
        skip_bad=data.skip_bad,
        progress=progress,
    )
    if not dist.is_main_process():
        return CheckpointEvaluation(result, folder, None, None)
    out = Path(out_dir) if out_dir is not None else RunFolder(run_folder_of(folder)).eval_dir
    write_results(result, out, checkpoint=str(folder))
    if not store_thresholds:
        return CheckpointEvaluation(result, folder, out, thresholds_path(out))
    update_thresholds(folder, result.thresholds)  # F1-max values replace false-alarm ones; the others are kept
    thresholds_file = thresholds_path(folder)
    return CheckpointEvaluation(result, folder, out, thresholds_file)
