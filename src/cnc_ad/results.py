"""Evaluation results on disk: the evaluation folder. The only module naming its files (``thresholds.json`` is
:mod:`cnc_ad.thresholds`'s).

An evaluation folder (written by ``cnc eval``, read by ``cnc report``)::

    metrics.json     {"categories": {cat: {metric: value}}, "mean": {...}, "left_out_of_mean": {metric: [cat]},
                      "protocol": str, "checkpoint": str}
    metrics.csv      one row per category, then "mean"
    thresholds.json  see :mod:`cnc_ad.thresholds` (a copy is stored beside the checkpoint, where prediction finds it)
    curves.json      {cat: {"image_roc": {"x": [...], "y": [...]}, "image_pr": ..., "pixel_roc": ..., ...}}
    examples.json    {cat: [{"image", "score", "label", "defect", "map": "examples/<file>.npy", "mask", "rank"}]}
    examples/*.npy   float16 anomaly maps (M, M) of the examples
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cnc_ad.errors import DataError
from cnc_ad.files import atomic_write_bytes, atomic_write_json, atomic_write_text
from cnc_ad.metrics import METRIC_KEYS
from cnc_ad.thresholds import THRESHOLDS_FILE, Thresholds, save_thresholds, thresholds_path

METRICS_FILE = "metrics.json"
METRICS_CSV_FILE = "metrics.csv"
CURVES_FILE = "curves.json"
EXAMPLES_FILE = "examples.json"
EXAMPLES_DIR = "examples"
REPORT_FILE = "report.html"


# -------------------------------------------------------------------------------------------- evaluation folder
@dataclass(frozen=True)
class Example:
    """One report example: a test image with its anomaly map (M, M), most or least anomalous of its category."""

    image: str
    score: float
    label: int
    defect: str
    mask: str | None
    rank: Literal["most", "least"]
    anomaly_map: np.ndarray  # (M, M)


def write_evaluation(
    out_dir: str | os.PathLike,
    *,
    metrics: Mapping[str, Any],
    thresholds: Thresholds,
    curves: Mapping[str, Any],
    examples: Mapping[str, list[Example]],
) -> Path:
    """Write an evaluation folder (see the module docstring); every file appears atomically.

    Args:
        out_dir: the folder (created when missing).
        metrics: the ``metrics.json`` mapping; its ``"categories"`` and ``"mean"`` also make ``metrics.csv``.
        thresholds: the thresholds found.
        curves: per category, curves as ``{"x": [...], "y": [...]}``.
        examples: per category, the report examples.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / METRICS_FILE, dict(metrics))
    atomic_write_text(out / METRICS_CSV_FILE, metrics_csv(metrics["categories"], metrics["mean"]))
    save_thresholds(out, thresholds)
    atomic_write_json(out / CURVES_FILE, dict(curves))
    (out / EXAMPLES_DIR).mkdir(exist_ok=True)
    listed: dict[str, list[dict[str, Any]]] = {}
    for category, chosen in examples.items():
        listed[category] = []
        for k, example in enumerate(chosen):
            name = f"{EXAMPLES_DIR}/{_safe(category)}_{example.rank}_{k}.npy"
            buffer = io.BytesIO()
            np.save(buffer, np.asarray(example.anomaly_map).astype(np.float16))
            atomic_write_bytes(out / name, buffer.getvalue())  # never a half-written map beside examples.json
            listed[category].append(
                {
                    "image": example.image,
                    "score": example.score,
                    "label": example.label,
                    "defect": example.defect,
                    "mask": example.mask,
                    "rank": example.rank,
                    "map": name,
                }
            )
    atomic_write_json(out / EXAMPLES_FILE, listed)
    return out


def metrics_csv(categories: Mapping[str, Mapping[str, float]], mean: Mapping[str, float]) -> str:
    """``metrics.csv``: a header, one row per category, then ``mean``; values with 6 decimals, ``nan`` if undefined."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["category", *METRIC_KEYS])
    for name, values in {**categories, "mean": mean}.items():
        writer.writerow([name, *(_fmt(values.get(key, math.nan)) for key in METRIC_KEYS)])
    return buffer.getvalue()


def _fmt(value: float | None) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.6f}"


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


@dataclass(frozen=True)
class StoredEvaluation:
    """The JSON files of an evaluation folder as read back; optional files are empty when absent."""

    root: Path
    metrics: dict[str, Any]
    thresholds: Thresholds
    curves: dict[str, Any]
    examples: dict[str, list[dict[str, Any]]]
    missing: tuple[str, ...] = ()  # optional files that were absent

    @property
    def categories(self) -> list[str]:
        return list(self.metrics["categories"])

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS_FILE


def is_evaluation_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds an evaluation's ``metrics.json``."""
    return (Path(path) / METRICS_FILE).is_file()


def read_evaluation(eval_dir: str | os.PathLike) -> StoredEvaluation:
    """Read the JSON files of an evaluation folder; map files stay on disk (``examples`` name them).

    Raises:
        DataError: no ``metrics.json`` (not an evaluation folder), or a file that is not JSON of the documented shape.
    """
    root = Path(eval_dir)
    metrics_path = root / METRICS_FILE
    if not metrics_path.is_file():
        what = "does not exist" if not root.exists() else f"has no {METRICS_FILE}"
        raise DataError(f"{root} {what}, so it is not an evaluation folder; evaluate a checkpoint into it first")
    metrics = _read_object(metrics_path)
    if not isinstance(metrics.get("categories"), dict) or not metrics["categories"]:
        raise DataError(f"{metrics_path} has no per-category metrics (a 'categories' object); evaluate again")
    missing = []
    optional: dict[str, Any] = {}
    for name in (CURVES_FILE, EXAMPLES_FILE):
        path = root / name
        if path.is_file():
            optional[name] = _read_object(path)
        else:
            missing.append(name)
            optional[name] = {}
    if thresholds_path(root).is_file():
        thresholds = Thresholds.from_json(_read_object(thresholds_path(root)), source=str(thresholds_path(root)))
    else:
        missing.append(THRESHOLDS_FILE)
        thresholds = Thresholds()
    return StoredEvaluation(
        root, metrics, thresholds, optional[CURVES_FILE], optional[EXAMPLES_FILE], tuple(sorted(missing))
    )


def _read_object(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read {path} as JSON ({err}); evaluate again to write it") from err
    if not isinstance(content, dict):
        raise DataError(f"{path} holds a JSON {type(content).__name__}, not an object; evaluate again")
    return content
