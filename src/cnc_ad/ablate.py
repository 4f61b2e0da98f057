"""The ablation grid: the full model, without the cross-modal constraint, without CFD only, without the MoE, without
both, and with feature-level normality promotion, each over one or more seeds.

Each variant is the same config with a few keys changed (:data:`VARIANTS`); with ``use_text`` and ``use_moe`` off the
model is plain multi-layer feature reconstruction. Every variant is trained and evaluated the same way, once per seed
(``train.seed``); the table gives the mean over the seeds and, with several, ± their standard deviation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnc_ad.config import Config, config_from_dict
from cnc_ad.files import atomic_write_json, atomic_write_text
from cnc_ad.metrics import METRIC_KEYS

VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "full (CNC)": {"model": {"use_text": True, "use_moe": True}},
    "w/o cross-modal": {"model": {"use_text": False, "use_moe": True}},
    "w/o CFD only": {"model": {"use_text": True, "use_moe": True}, "train": {"lambda_cfd": 0.0}},
    "w/o MoE": {"model": {"use_text": True, "use_moe": False}},
    "w/o both (plain reconstruction)": {"model": {"use_text": False, "use_moe": False}},
    "with FNP": {"model": {"use_text": True, "use_moe": True, "fnp": True}},
}


@dataclass(frozen=True)
class AblationResult:
    means: dict[str, dict[str, float]]  # per variant, the mean over the seeds of each mean metric
    table: str
    stds: dict[str, dict[str, float]] = field(default_factory=dict)  # per variant, the standard deviation over seeds


def ablation_table(means: dict[str, dict[str, float]], stds: dict[str, dict[str, float]] | None = None) -> str:
    """A Markdown table in percent; ``mean ± std`` where ``stds`` (over seeds) are given."""
    short = ["I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO"]
    lines = ["| variant | " + " | ".join(short) + " |", "|---" * (len(short) + 1) + "|"]
    for name, mean in means.items():
        cells = []
        for key in METRIC_KEYS:
            value, spread = mean.get(key, math.nan), (stds or {}).get(name, {}).get(key)
            if math.isnan(value):
                cells.append("n/a")
            else:
                cells.append(f"{100 * value:.1f}" + (f" ± {100 * spread:.1f}" if spread is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _over_seeds(runs: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and (sample) standard deviation over seeds of each metric; NaN where a run has none."""
    means, stds = {}, {}
    for key in METRIC_KEYS:
        values = np.array([run.get(key, math.nan) for run in runs], dtype=np.float64)
        means[key] = float(values.mean()) if len(values) else math.nan
        stds[key] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return means, stds


def run_ablation(
    config: Config,
    out: str | Path,
    *,
    clip_weights: str | None = None,
    trust_pickle: bool = False,
    progress: bool = True,
    seeds: Sequence[int] | None = None,
) -> AblationResult:
    """Train and evaluate every variant of :data:`VARIANTS` once per seed (default: ``train.seed``) under
    ``out/<variant>`` (``out/<variant>/seed<k>`` with several seeds).

    Returns:
        the mean metrics of every variant over the seeds, their standard deviations (with two seeds or more) and the
        table; ``ablation.json`` and ``ablation.md`` in ``out`` hold the same, ``ablation.json`` every run too.
    """
    seeds = list(seeds) if seeds is not None else [config.train.seed]
    if not seeds:
        raise ValueError("give at least one seed")
    from cnc_ad.data import scan_dataset

    out = Path(out)
    index = scan_dataset(config.data.root, config.data.format, config.data.categories, skip_bad=config.data.skip_bad)
    means: dict[str, dict[str, float]] = {}
    stds: dict[str, dict[str, float]] = {}
    runs: dict[str, dict[str, dict[str, float]]] = {}
    for name, changes in VARIANTS.items():
        variant_dir = out / "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
        runs[name] = {}
        for seed in seeds:
            folder = variant_dir / f"seed{seed}" if len(seeds) > 1 else variant_dir
            variant = config_from_dict({**changes, "train": {**changes.get("train", {}), "seed": seed}}, config)
            runs[name][str(seed)] = _train_and_evaluate(variant, folder, index, clip_weights, trust_pickle, progress)
        means[name], stds[name] = _over_seeds(list(runs[name].values()))
    spread = stds if len(seeds) > 1 else None
    table = ablation_table(means, spread)
    atomic_write_json(out / "ablation.json", {"seeds": list(seeds), "means": means, "stds": stds, "runs": runs})
    atomic_write_text(out / "ablation.md", table + "\n")
    return AblationResult(means, table, stds if spread else {})


def _train_and_evaluate(
    variant: Config,
    folder: Path,
    index: Any,
    clip_weights: str | None,
    trust_pickle: bool,
    progress: bool,
) -> dict[str, float]:
    from cnc_ad.evaluate import evaluate_checkpoint
    from cnc_ad.runs import RunFolder
    from cnc_ad.train import train

    result = train(
        variant, folder, progress=progress, index=index, clip_weights=clip_weights, trust_pickle=trust_pickle
    )
    done = evaluate_checkpoint(
        result.checkpoint,
        variant,
        out_dir=RunFolder(folder).eval_dir,
        device=variant.train.device,
        index=index,
        clip_weights=clip_weights,
        trust_pickle=trust_pickle,
        progress=progress,
    )
    return done.result.mean
