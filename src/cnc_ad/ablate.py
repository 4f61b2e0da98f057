"""The ablation grid: the full model, without the cross-modal constraint, without CFD only, without the MoE, without
both, and with feature-level normality promotion, each over one or more seeds.

Each variant is the same config with a few keys changed (:data:`VARIANTS`); with ``use_text`` and ``use_moe`` off the
model is plain multi-layer feature reconstruction. Every variant is trained and evaluated the same way, once per seed
(``train.seed``); the table gives the mean over the seeds and, with several, ± their standard deviation.

A grid on real data takes hours on a CPU, so it can be stopped and run again: a run folder that already holds a
finished evaluation of the same config is read, not trained again; one whose training was interrupted is resumed;
one that holds another config is refused. ``variants`` selects rows, so the grid can also be split over processes
or machines that share ``out`` and gathered by one last call over all rows (which then only reads).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnc_ad.config import Config, config_from_dict
from cnc_ad.errors import ConfigError
from cnc_ad.files import atomic_write_json, atomic_write_text
from cnc_ad.metrics import METRIC_KEYS, METRIC_LABELS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    """One row of the grid: ``key`` names it on the command line and its folder, ``title`` in the table.

    ``changes`` are config changes for training and evaluation. A row that differs from another only at inference
    names that row in ``trained_as`` and the model keys it changes in ``inference``: it evaluates that row's
    checkpoint (the same training would give the same weights) into its own folder.
    """

    key: str
    title: str
    changes: dict[str, dict[str, Any]]
    trained_as: str | None = None
    inference: dict[str, Any] = field(default_factory=dict)


VARIANTS: tuple[Variant, ...] = (
    Variant("full", "full (CNC)", {"model": {"use_text": True, "use_moe": True}}),
    Variant("no-text", "w/o cross-modal", {"model": {"use_text": False, "use_moe": True}}),
    Variant("no-cfd", "w/o CFD only", {"model": {"use_text": True, "use_moe": True}, "train": {"lambda_cfd": 0.0}}),
    Variant("no-moe", "w/o MoE", {"model": {"use_text": True, "use_moe": False}}),
    Variant("plain", "w/o both (plain reconstruction)", {"model": {"use_text": False, "use_moe": False}}),
    Variant("fnp", "with FNP", {}, trained_as="full", inference={"fnp": True}),  # FNP acts at inference only
)
VARIANT_KEYS = tuple(v.key for v in VARIANTS)


@dataclass(frozen=True)
class AblationResult:
    means: dict[str, dict[str, float]]  # per variant title, the mean over the seeds of each mean metric
    table: str
    stds: dict[str, dict[str, float]] = field(default_factory=dict)  # per variant, the standard deviation over seeds
    trained: int = 0  # runs trained (or resumed) by this call; the others were read from their folders
    missing: list[str] = field(default_factory=list)  # with ``collect_only``: the runs not finished yet (folders)


def ablation_table(means: dict[str, dict[str, float]], stds: dict[str, dict[str, float]] | None = None) -> str:
    """A Markdown table in percent; ``mean ± std`` where ``stds`` (over seeds) are given."""
    short = [METRIC_LABELS[key] for key in METRIC_KEYS]
    lines = ["| variant | " + " | ".join(short) + " |", "|---" * (len(short) + 1) + "|"]
    for name, mean in means.items():
        cells = []
        for key in METRIC_KEYS:
            value, spread = mean.get(key, math.nan), (stds or {}).get(name, {}).get(key)
            if math.isnan(value):
                cells.append("n/a")
            elif spread is None or math.isnan(spread):  # one seed, or a row with one seed so far
                cells.append(f"{100 * value:.1f}")
            else:
                cells.append(f"{100 * value:.1f} ± {100 * spread:.1f}")
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


def select_variants(keys: Sequence[str] | None) -> list[Variant]:
    """The variants named by ``keys`` in grid order (all when None).

    Raises:
        ConfigError: an unknown key.
    """
    if keys is None:
        return list(VARIANTS)
    unknown = sorted(set(keys) - set(VARIANT_KEYS))
    if unknown:
        raise ConfigError(f"unknown ablation variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANT_KEYS)}")
    return [v for v in VARIANTS if v.key in keys]


def run_ablation(
    config: Config,
    out: str | Path,
    *,
    clip_weights: str | None = None,
    trust_pickle: bool = False,
    progress: bool = True,
    seeds: Sequence[int] | None = None,
    variants: Sequence[str] | None = None,
    collect_only: bool = False,
) -> AblationResult:
    """Train and evaluate the variants of :data:`VARIANTS` named by ``variants`` (default all) once per seed
    under ``out/<key>/seed<k>`` (without ``seeds``: once, with ``train.seed``, under ``out/<key>``).

    Runs already finished and evaluated with the same config are read back; interrupted ones are resumed. With
    ``collect_only`` nothing is trained or evaluated: the table holds what is finished (a row over fewer seeds says
    so in its name) and ``missing`` lists the rest.

    Returns:
        the mean metrics of every variant over the seeds, their standard deviations (with two seeds or more) and the
        table; ``ablation.json`` and ``ablation.md`` in ``out`` hold the same, ``ablation.json`` every run too.

    Raises:
        ConfigError: no seed, an unknown variant, or a run folder that holds a run of another config.
    """
    explicit_seeds = seeds is not None
    seeds = list(seeds) if seeds is not None else [config.train.seed]
    if not seeds:
        raise ConfigError("give at least one seed")
    chosen = select_variants(variants)
    from cnc_ad.data import scan_dataset

    out = Path(out)
    index = scan_dataset(config.data.root, config.data.format, config.data.categories, skip_bad=config.data.skip_bad)
    means: dict[str, dict[str, float]] = {}
    stds: dict[str, dict[str, float]] = {}
    runs: dict[str, dict[str, dict[str, float]]] = {}
    trained = 0
    missing: list[str] = []
    by_key = {v.key: v for v in VARIANTS}

    def folder_of(variant: Variant, seed: int) -> Path:
        return out / variant.key / f"seed{seed}" if explicit_seeds else out / variant.key

    def config_of(variant: Variant, seed: int) -> Config:
        changes = variant.changes
        return config_from_dict({**changes, "train": {**changes.get("train", {}), "seed": seed}}, config)

    for variant in chosen:
        runs[variant.title] = {}
        for seed in seeds:
            base = by_key[variant.trained_as] if variant.trained_as else variant
            mean, was_trained = _train_and_evaluate(
                config_of(base, seed), folder_of(base, seed), index, clip_weights, trust_pickle, progress, collect_only
            )
            trained += was_trained
            if variant is not base and mean is not None:
                mean = _evaluate_inference_variant(
                    config_of(base, seed), folder_of(base, seed), folder_of(variant, seed), variant, index, progress,
                    clip_weights, trust_pickle, collect_only,
                )  # fmt: skip
            if mean is None:
                missing.append(str(folder_of(variant, seed)))
                continue
            runs[variant.title][str(seed)] = mean
        done = list(runs[variant.title].values())
        if not done:
            continue
        title = variant.title if len(done) == len(seeds) else f"{variant.title} ({len(done)} of {len(seeds)} seeds)"
        means[title], stds[title] = _over_seeds(done)
    spread = stds if len(seeds) > 1 else None
    table = ablation_table(means, spread)
    record = {"seeds": list(seeds), "means": means, "stds": stds, "runs": runs, "missing": missing}
    atomic_write_json(out / "ablation.json", record)
    atomic_write_text(out / "ablation.md", table + "\n")
    return AblationResult(means, table, stds if spread else {}, trained, missing)


def config_differences(saved: Config, wanted: Config) -> list[str]:
    """``group.key`` of every setting in which two configs differ."""
    a, b = saved.to_dict(), wanted.to_dict()
    return [
        f"{group}.{key}"
        for group in b
        for key in sorted(set(a.get(group, {})) | set(b[group]))
        if a.get(group, {}).get(key) != b[group].get(key)
    ]


def _train_and_evaluate(
    variant: Config,
    folder: Path,
    index: Any,
    clip_weights: str | None,
    trust_pickle: bool,
    progress: bool,
    collect_only: bool = False,
) -> tuple[dict[str, float] | None, bool]:
    """The mean metrics of one run of the grid (None: not finished, with ``collect_only``), and whether this call
    trained it (False: read back).
    """
    from cnc_ad.evaluate import evaluate_checkpoint
    from cnc_ad.results import is_evaluation_folder, read_evaluation
    from cnc_ad.runs import RunFolder
    from cnc_ad.train import train

    run = RunFolder(folder)
    resume = run.is_run()
    if resume:
        differences = config_differences(run.read_config(), variant)
        if differences:
            raise ConfigError(
                f"{folder} holds a run of another config (differs in {', '.join(differences)}); "
                "choose another output folder, or remove that folder to train it again"
            )
    checkpoint = run.final_checkpoint()
    if checkpoint is not None and is_evaluation_folder(run.eval_dir):
        log.info("%s: finished and evaluated with the same config, read back", folder)
        return dict(read_evaluation(run.eval_dir).metrics["mean"]), False
    if collect_only:
        return None, False
    if checkpoint is None:
        if resume:
            log.info("%s: interrupted, resuming", folder)
        checkpoint = train(
            variant,
            folder,
            resume=resume,
            progress=progress,
            index=index,
            clip_weights=clip_weights,
            trust_pickle=trust_pickle,
        ).checkpoint
    done = evaluate_checkpoint(
        checkpoint,
        variant,
        out_dir=run.eval_dir,
        device=variant.train.device,
        index=index,
        clip_weights=clip_weights,
        trust_pickle=trust_pickle,
        progress=progress,
    )
    return dict(done.result.mean), True


def _evaluate_inference_variant(
    config: Config,
    base_folder: Path,
    folder: Path,
    variant: Variant,
    index: Any,
    progress: bool,
    clip_weights: str | None,
    trust_pickle: bool,
    collect_only: bool = False,
) -> dict[str, float] | None:
    """Evaluate the finished run in ``base_folder`` with ``variant.inference`` into ``folder/eval``; read an
    evaluation already there back when it is of that run's final checkpoint and newer than it (``collect_only``:
    None when there is none).
    """
    from cnc_ad.evaluate import evaluate_checkpoint
    from cnc_ad.results import is_evaluation_folder, read_evaluation
    from cnc_ad.runs import RunFolder

    checkpoint = RunFolder(base_folder).final_checkpoint()
    assert checkpoint is not None  # the base run was just trained or read back
    eval_dir = RunFolder(folder).eval_dir
    if is_evaluation_folder(eval_dir):
        stored = read_evaluation(eval_dir)
        if Path(str(stored.metrics.get("checkpoint"))).resolve() == checkpoint.resolve() and (
            stored.metrics_path.stat().st_mtime >= checkpoint.stat().st_mtime
        ):
            log.info("%s: evaluated from %s with %s, read back", folder, checkpoint, variant.inference)
            return dict(stored.metrics["mean"])
    if collect_only:
        return None
    done = evaluate_checkpoint(
        checkpoint,
        config,
        out_dir=eval_dir,
        device=config.train.device,
        index=index,
        clip_weights=clip_weights,
        trust_pickle=trust_pickle,
        progress=progress,
        inference={**variant.inference},
        store_thresholds=False,
    )
    return dict(done.result.mean)
