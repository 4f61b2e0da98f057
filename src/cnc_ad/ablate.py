"""The paper's ablation grid: the full model, without the cross-modal constraint, without the MoE, without both.

Each variant is the same config with ``model.use_text`` / ``model.use_moe`` switched; with both off the model is plain
multi-layer feature reconstruction. Every variant is trained and evaluated the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cnc_ad.config import Config, config_from_dict
from cnc_ad.files import atomic_write_json, atomic_write_text
from cnc_ad.metrics import METRIC_KEYS

VARIANTS: dict[str, dict[str, bool]] = {
    "full (CNC)": {"use_text": True, "use_moe": True},
    "w/o cross-modal": {"use_text": False, "use_moe": True},
    "w/o MoE": {"use_text": True, "use_moe": False},
    "w/o both (plain reconstruction)": {"use_text": False, "use_moe": False},
}


@dataclass(frozen=True)
class AblationResult:
    means: dict[str, dict[str, float]]
    table: str


def ablation_table(means: dict[str, dict[str, float]]) -> str:
    short = ["I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO"]
    lines = ["| variant | " + " | ".join(short) + " |", "|---" * (len(short) + 1) + "|"]
    for name, mean in means.items():
        cells = ["n/a" if math.isnan(mean.get(k, math.nan)) else f"{100 * mean[k]:.1f}" for k in METRIC_KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_ablation(
    config: Config,
    out: str | Path,
    *,
    clip_weights: str | None = None,
    trust_pickle: bool = False,
    progress: bool = True,
) -> AblationResult:
    """Train and evaluate every variant of :data:`VARIANTS` under ``out/<variant>``; return the mean metrics."""
    from cnc_ad.data import scan_dataset
    from cnc_ad.evaluate import evaluate_checkpoint
    from cnc_ad.runs import RunFolder
    from cnc_ad.train import train

    out = Path(out)
    index = scan_dataset(config.data.root, config.data.format, config.data.categories, skip_bad=config.data.skip_bad)
    means: dict[str, dict[str, float]] = {}
    for name, switches in VARIANTS.items():
        folder = out / "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")
        variant = config_from_dict({"model": switches}, config)
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
        means[name] = done.result.mean
    table = ablation_table(means)
    atomic_write_json(out / "ablation.json", means)
    atomic_write_text(out / "ablation.md", table + "\n")
    return AblationResult(means, table)
