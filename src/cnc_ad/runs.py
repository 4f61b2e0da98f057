"""The run folder of a training run: the only module naming its files.

::

    config.yaml            the resolved config the run was started with
    log.jsonl              one line per logging step (step, epoch, lr, every loss term, images/s)
    checkpoints/epoch-NNNN/ checkpoint folders (see :mod:`cnc_ad.checkpoint`); the newest and the previous one are kept
    latest                 the newest checkpoint folder, relative to the run folder (written atomically)
    result.json            {"checkpoint": relative path, "epochs", "steps", "last_loss"} once training has finished
    feature_cache/         the disk feature cache while training runs (deleted at the end)
    eval/                  the default evaluation folder (see :mod:`cnc_ad.results`)

``RUN/last`` is accepted as a name of the run's latest checkpoint wherever a checkpoint is expected.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnc_ad.config import Config, load_config, save_config
from cnc_ad.files import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl

CONFIG_FILE = "config.yaml"
LOG_FILE = "log.jsonl"
RESULT_FILE = "result.json"
LATEST_FILE = "latest"
LAST_ALIAS = "last"
CHECKPOINTS_DIR = "checkpoints"
FEATURE_CACHE_DIR = "feature_cache"
EVAL_DIR = "eval"


@dataclass(frozen=True)
class RunFolder:
    """Paths and small files of one run folder; nothing is created until something is written."""

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    # -- paths ------------------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    @property
    def result_path(self) -> Path:
        return self.path / RESULT_FILE

    @property
    def latest_path(self) -> Path:
        return self.path / LATEST_FILE

    @property
    def feature_cache_dir(self) -> Path:
        return self.path / FEATURE_CACHE_DIR

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL_DIR

    def checkpoint_dir(self, epoch: int) -> Path:
        """The checkpoint folder written at the end of ``epoch`` (1-based count of finished epochs)."""
        return self.path / CHECKPOINTS_DIR / f"epoch-{epoch:04d}"

    # -- state ------------------------------------------------------------------------------------------------
    def is_run(self) -> bool:
        """Whether a run was started here (it has its ``config.yaml``)."""
        return self.config_path.is_file()

    def has_checkpoint(self) -> bool:
        """Whether a checkpoint was written here (it has a ``latest`` file)."""
        return self.latest_path.is_file()

    def write_config(self, config: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(config, self.config_path)

    def read_config(self, overrides: Sequence[str] = ()) -> Config:
        """The run's config with ``group.key=value`` overrides (ConfigError when it is missing or invalid)."""
        return load_config(self.config_path, overrides)

    # -- log --------------------------------------------------------------------------------------------------
    def start_log(self, through_step: int | None = None) -> None:
        """Start ``log.jsonl`` afresh, or (resuming) keep its lines up to ``through_step``: the steps after the
        checkpoint a run continues from were lost with the interruption, so are their lines.
        """
        kept = []
        if through_step is not None:
            kept = [r for r in read_jsonl(self.log_path) if r.get("step", 0) <= through_step]
        atomic_write_text(self.log_path, "".join(json.dumps(r) + "\n" for r in kept))

    def append_log(self, record: dict[str, Any]) -> None:
        append_jsonl(self.log_path, record)

    def read_log(self) -> list[dict[str, Any]]:
        return read_jsonl(self.log_path)

    # -- result -----------------------------------------------------------------------------------------------
    def write_result(self, checkpoint: Path, epochs: int, steps: int, last_loss: dict[str, float]) -> None:
        """Record a finished training run; ``checkpoint`` is stored relative to the run folder."""
        atomic_write_json(
            self.result_path,
            {
                "checkpoint": os.path.relpath(checkpoint, self.path),
                "epochs": epochs,
                "steps": steps,
                "last_loss": last_loss,
            },
        )

    def read_result(self) -> dict[str, Any] | None:
        """``result.json`` of a finished run, or None (unfinished, or unreadable)."""
        try:
            value = json.loads(self.result_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def final_checkpoint(self) -> Path | None:
        """The checkpoint folder ``result.json`` names, or None when training has not finished."""
        result = self.read_result()
        name = result.get("checkpoint") if result else None
        return self.path / name if isinstance(name, str) and name else None

    def remove_crash_leftovers(self) -> list[Path]:
        """Delete the temporary files and folders an interrupted save leaves (``.<name>.*.tmp`` beside the
        checkpoints and the run's own files); return what was removed.
        """
        removed = []
        for folder in (self.path, self.path / CHECKPOINTS_DIR):
            if not folder.is_dir():
                continue
            for leftover in folder.glob(".*.tmp"):
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
                removed.append(leftover)
        return removed

    def complete_checkpoints(self, is_complete: Callable[[Path], bool]) -> list[Path]:
        """The checkpoint folders of ``checkpoints/`` that ``is_complete`` accepts, oldest epoch first."""
        folder = self.path / CHECKPOINTS_DIR
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.glob("epoch-*") if p.is_dir() and is_complete(p))

    # -- latest -----------------------------------------------------------------------------------------------
    def read_latest(self) -> Path | None:
        """The checkpoint folder the ``latest`` file names, or None without one."""
        try:
            name = self.latest_path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            return None
        return self.path / name if name else None

    def point_latest(self, checkpoint: Path) -> None:
        """Make ``latest`` name ``checkpoint`` (atomically: a reader sees the old or the new name)."""
        atomic_write_text(self.latest_path, os.path.relpath(checkpoint, self.path) + "\n")


def is_latest_file(path: Path) -> bool:
    """Whether ``path`` is a run folder's ``latest`` file."""
    return path.name == LATEST_FILE and path.is_file()


def is_last_alias(path: Path) -> bool:
    """Whether ``path`` is ``RUN/last``, the alias of a run folder's latest checkpoint."""
    return path.name == LAST_ALIAS and RunFolder(path.parent).has_checkpoint()


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint folder belongs to: the nearest ancestor with a ``latest`` file, else its parent."""
    for ancestor in list(checkpoint.parents)[:3]:
        if RunFolder(ancestor).latest_path.is_file():
            return ancestor
    return checkpoint.parent


def prune_checkpoints(parent: Path, keep: int, newest: Path, previous: Path | None, is_checkpoint: Callable) -> None:
    """Remove old checkpoint folders of ``parent``: keep the newest, the previous ``latest``, then the most recent.

    Only folders that ``is_checkpoint(folder)`` recognises are removed (never hidden or foreign ones).
    """
    folders = [p for p in parent.iterdir() if p.is_dir() and not p.name.startswith(".") and is_checkpoint(p)]
    order = sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)
    kept = [newest.name]
    if previous is not None and previous.parent.resolve() == parent.resolve() and previous.name != newest.name:
        kept.append(previous.name)
    kept += [p.name for p in order if p.name not in kept]
    for folder in folders:
        if folder.name not in kept[:keep]:
            shutil.rmtree(folder, ignore_errors=True)
