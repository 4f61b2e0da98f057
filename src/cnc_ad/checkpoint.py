"""Checkpoints: safetensors + JSON folders, written atomically and checksummed; never pickle.

A checkpoint is a folder::

    model.safetensors   trainable tensors + stored text features (not the frozen backbone)
    model.json          {"format": "cnc-ad-checkpoint", "version", "config": {resolved model config},
                         "sha256": <of model.safetensors>, "extra": {...}}
    trainer.safetensors optional, for resuming: optimiser/scheduler/RNG tensors
    trainer.json        {"format": "cnc-ad-trainer-state", "sha256": <of trainer.safetensors>, "meta": {...}}

It is written into a temporary sibling folder, every file fsynced, then renamed into place. Its parent is the run
folder (:mod:`cnc_ad.runs`), whose ``latest`` file is pointed at the newest checkpoint folder; the previous checkpoint
folder is kept, older ones are removed (``keep``). Loading rebuilds the model from ``model.json`` plus the backbone
weights (a random backbone is seeded, so a model built with ``pretrained=False`` round-trips exactly).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from cnc_ad import __version__
from cnc_ad.config import ModelConfig, config_from_dict
from cnc_ad.errors import CheckpointError, ConfigError
from cnc_ad.files import default_mode, fsync_path, sha256_file
from cnc_ad.model.encoders import is_pickle_file
from cnc_ad.runs import LATEST_FILE, RunFolder, is_last_alias, is_latest_file, prune_checkpoints
from cnc_ad.runs import run_folder_of as _run_folder_of
from cnc_ad.thresholds import DIGEST_CHARS

if TYPE_CHECKING:
    from cnc_ad.model import CNC

log = logging.getLogger(__name__)

FORMAT = "cnc-ad-checkpoint"
TRAINER_FORMAT = "cnc-ad-trainer-state"
MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
TRAINER_FILE = "trainer.safetensors"
TRAINER_META_FILE = "trainer.json"


# ------------------------------------------------------------------------------------------------------- files
def _write_json(path: Path, value: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    fsync_path(path)


def _save_tensors(path: Path, tensors: Mapping[str, Tensor]) -> str:
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))
    fsync_path(path)
    return sha256_file(path)


# -------------------------------------------------------------------------------------------------------- save
def save_checkpoint(
    directory: str | Path,
    model: CNC,
    *,
    trainer_tensors: dict[str, Tensor] | None = None,
    trainer_meta: dict | None = None,
    extra: dict | None = None,
    run_dir: str | Path | None = None,
    keep: int | None = 2,
) -> Path:
    """Write a checkpoint folder atomically and point the run folder's ``latest`` at it.

    Stores the model's text features first (:meth:`CNC.store_text_features`: the ``normal_text_*`` buffers and the
    ``text_stored`` flag), so a checkpoint is always ready for inference.

    Args:
        directory: the checkpoint folder to write (e.g. ``runs/demo/checkpoints/epoch-0003``).
        model: a :class:`cnc_ad.model.CNC`.
        trainer_tensors: tensors needed to resume training (optimiser state, RNG states), saved as safetensors.
        trainer_meta: JSON-able resume state (epoch, step, optimiser hyper-parameters, ...).
        extra: JSON-able information stored in ``model.json`` under ``"extra"``.
        run_dir: the run folder whose ``latest`` file is pointed at this checkpoint; default ``directory.parent``.
        keep: checkpoint folders to keep beside ``directory`` (the new one, the previous ``latest``, then the most
            recent; None keeps all). Only folders this module wrote (a ``model.json`` of this format) are removed.

    Returns:
        The checkpoint folder.
    """
    directory = Path(directory)
    parent = directory.parent
    run = RunFolder(run_dir if run_dir is not None else parent)
    parent.mkdir(parents=True, exist_ok=True)
    model.store_text_features()
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=parent))
    os.chmod(tmp, default_mode(folder=True))
    try:
        digest = _save_tensors(tmp / MODEL_FILE, model.checkpoint_state_dict())
        meta = {
            "format": FORMAT,
            "version": __version__,
            "config": _config_dict(model.config),
            "sha256": digest,
            "extra": dict(extra or {}),
        }
        _write_json(tmp / META_FILE, meta)
        if trainer_tensors is not None or trainer_meta is not None:
            trainer_digest = _save_tensors(tmp / TRAINER_FILE, trainer_tensors or {})
            _write_json(
                tmp / TRAINER_META_FILE,
                {
                    "format": TRAINER_FORMAT,
                    "version": __version__,
                    "sha256": trainer_digest,
                    "meta": trainer_meta or {},
                },
            )
        fsync_path(tmp)
        previous = run.read_latest()
        if directory.exists():  # replacing a folder of the same name: move it aside first
            trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=parent))
            if previous is not None and previous.resolve() == directory.resolve():
                # `latest` names it: point `latest` at a whole copy first, so a crash between the renames below
                # never leaves `latest` naming a missing folder.
                _link_copy(directory, trash / directory.name)
                run.point_latest(trash / directory.name)
            os.replace(directory, trash / f"{directory.name}.replaced")
        else:
            trash = None
        os.replace(tmp, directory)
        fsync_path(parent)
        run.point_latest(directory)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        prune_checkpoints(parent, keep=max(keep, 1), newest=directory, previous=previous, is_checkpoint=is_checkpoint)
    log.info("saved checkpoint %s", directory)
    return directory


def _link_copy(source: Path, target: Path) -> None:
    """Copy a flat checkpoint folder by hard links (no data copied; a real copy where links are not supported)."""
    target.mkdir()
    for file in source.iterdir():
        try:
            os.link(file, target / file.name)
        except OSError:
            shutil.copy2(file, target / file.name)
    fsync_path(target)


def _config_dict(config: ModelConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.__dict__.items()}


def is_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` is a checkpoint folder of this format (its metadata file says so)."""
    try:
        return json.loads((folder / META_FILE).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def resumable_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint an interrupted run continues from, or None when none was completed.

    The one ``latest`` names; without a usable ``latest`` (a crash between writing a checkpoint folder and pointing
    ``latest`` at it), the newest complete checkpoint folder with trainer state. A checkpoint folder appears only
    whole (it is written under a temporary name and renamed), so a complete one is safe to continue from.
    """
    run = RunFolder(run_dir)
    target = run.read_latest()
    if target is not None and is_checkpoint(target) and (target / TRAINER_META_FILE).is_file():
        return target
    complete = run.complete_checkpoints(lambda p: is_checkpoint(p) and (p / TRAINER_META_FILE).is_file())
    return complete[-1] if complete else None


def latest_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint folder that the run folder's ``latest`` file names.

    Raises:
        CheckpointError: no ``latest`` file, or it names no checkpoint.
    """
    run = RunFolder(run_dir)
    target = run.read_latest()
    if target is None:
        raise CheckpointError(f"run folder {run.path} has no checkpoint yet (no '{LATEST_FILE}' file)")
    if not (target / META_FILE).is_file():
        raise CheckpointError(
            f"run folder {run.path}: its '{LATEST_FILE}' file names {target}, which is not a checkpoint folder; "
            "pass one of the checkpoint folders inside it"
        )
    return target


def run_folder_of(checkpoint: str | Path) -> Path:
    """The run folder a checkpoint belongs to: the nearest ancestor with a ``latest`` file, else its parent."""
    return _run_folder_of(resolve_checkpoint(checkpoint))


# -------------------------------------------------------------------------------------------------------- load
def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint folder that ``path`` names.

    Accepts a checkpoint folder, a run folder (its ``latest`` file names the newest checkpoint), the ``latest`` file
    itself, or ``RUN/last`` as an alias of the run folder's latest checkpoint.

    Raises:
        CheckpointError: nothing usable there, or a pickle file.
    """
    path = Path(path).expanduser()
    if path.is_file():
        if is_latest_file(path):
            return resolve_checkpoint(path.parent)
        if path.name in (META_FILE, MODEL_FILE):
            return path.parent
        if path.stat().st_size and is_pickle_file(path):
            raise CheckpointError(
                f"{path} is a pickle file, which can run code when loaded; cnc-ad checkpoints are folders with "
                f"{MODEL_FILE} + {META_FILE} (no pickle). trust_pickle=True only applies to OpenAI CLIP backbone files "
                "(clip_weights=PATH)"
            )
        raise CheckpointError(f"{path} is not a checkpoint; pass a checkpoint folder or a run folder")
    if (path / META_FILE).is_file():
        return path
    if path.is_dir() and RunFolder(path).has_checkpoint():
        return latest_checkpoint(path)
    if is_last_alias(path):
        return resolve_checkpoint(path.parent)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found")
    raise CheckpointError(
        f"{path} is neither a checkpoint folder ({META_FILE} missing) nor a run folder ('{LATEST_FILE}' missing)"
    )


def read_checkpoint_meta(path: str | Path) -> dict:
    """The ``model.json`` of a checkpoint (or run folder), checked for format and version.

    Raises:
        CheckpointError: missing, unreadable, or of another format.
    """
    folder = resolve_checkpoint(path)
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {folder}: {META_FILE} is unreadable ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {folder}: {META_FILE} is not a {FORMAT} file")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("sha256"), str):
        raise CheckpointError(f"checkpoint {folder}: {META_FILE} lacks its 'config' or 'sha256'")
    major = str(meta.get("version", "")).split(".")[0]
    if major != __version__.split(".")[0]:
        raise CheckpointError(
            f"checkpoint {folder} was written by cnc-ad {meta.get('version')!r}; this is {__version__}: retrain or use "
            "a matching version"
        )
    meta["path"] = str(folder)
    return meta


def model_digest(meta: Mapping[str, Any]) -> str:
    """The identity of a checkpoint's model: 16 hex digits of the SHA-256 of its config and weights digest (from
    :func:`read_checkpoint_meta`; the ``extra`` training notes do not count), equal for copies of the checkpoint.
    """
    text = json.dumps({"config": meta["config"], "sha256": meta["sha256"]}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:DIGEST_CHARS]


def _load_verified(path: Path, expected_sha: str, what: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    if sha256_file(path) != expected_sha:
        raise CheckpointError(
            f"{what} {path} does not match its recorded SHA-256: it is truncated or was altered; use an intact copy "
            "(the run folder keeps the previous checkpoint)"
        )
    try:
        return load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"{what} {path} is not a valid safetensors file ({err})") from err


def checkpoint_config(meta: Mapping[str, Any]) -> ModelConfig:
    """The validated model config of a checkpoint's metadata (ConfigError names a bad key).

    Checkpoints written before ``model.normalize`` / ``model.token_stride`` existed (cnc-ad 0.1) ran CLIP encoders
    with CLIP mean/std and timm encoders with ImageNet mean/std on the 1/16 grid: those values are filled in, so the
    preset's newer defaults never change an old model.
    """
    values = dict(meta["config"])
    if "normalize" not in values:
        values["normalize"] = "clip" if values.get("encoder") == "clip" else "imagenet"
    if "token_stride" not in values and values.get("encoder") == "timm":
        values["token_stride"] = 16
    try:
        return config_from_dict({"model": values}).model
    except ConfigError as err:
        raise ConfigError(f"checkpoint {meta.get('path', '')}: {err}") from err


def load_model(
    path: str | Path,
    *,
    clip_weights: str | None = None,
    trust_pickle: bool = False,
    pretrained: bool = True,
    map_location: str | torch.device = "cpu",
) -> CNC:
    """Rebuild a :class:`cnc_ad.model.CNC` from a checkpoint (or a run folder's latest), in eval mode.

    Args:
        path: checkpoint folder, run folder, or ``RUN/last``.
        clip_weights: local CLIP weights file (else open_clip downloads the checkpoint's ``pretrained`` tag).
        trust_pickle: allow a pickle / TorchScript ``clip_weights`` (the original OpenAI ``.pt`` files).
        pretrained: False builds a random (seeded) backbone instead of loading weights.
        map_location: device for the model.

    Raises:
        CheckpointError: missing, altered, truncated, or inconsistent with the model.
        ConfigError: the stored config has an unknown key or a wrong type.
        WeightsError: the backbone weights cannot be loaded.
    """
    from cnc_ad.model import build_model

    meta = read_checkpoint_meta(path)
    folder = Path(meta["path"])
    config = checkpoint_config(meta)
    tensors = _load_verified(folder / MODEL_FILE, meta["sha256"], "checkpoint")
    model = build_model(config, pretrained=pretrained, clip_weights=clip_weights, trust_pickle=trust_pickle)
    _load_into(model, folder, tensors)
    return model.to(map_location).eval()


def load_trainable_state(model: CNC, path: str | Path) -> None:
    """Load a checkpoint's tensors (trainable parameters, stored text features) into an existing model, for resuming.

    Raises:
        CheckpointError: altered, truncated, or not matching the model.
    """
    meta = read_checkpoint_meta(path)
    folder = Path(meta["path"])
    _load_into(model, folder, _load_verified(folder / MODEL_FILE, meta["sha256"], "checkpoint"))


def _upgrade_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of a checkpoint in the current layout.

    Checkpoints written before the ``text_stored`` flag (cnc-ad 0.1; CHANGELOG, "Unreleased", "On-disk formats") carry
    the ``normal_text_*`` buffers that their writer stored, without the flag: they count as stored.
    """
    if "normal_text_0" in tensors and "text_stored" not in tensors:
        return {**tensors, "text_stored": torch.tensor(True)}
    return tensors


def _load_into(model: CNC, folder: Path, tensors: dict[str, Tensor]) -> None:
    tensors = _upgrade_tensors(tensors)
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"checkpoint {folder} does not fit the model: {err}") from err
    missing = [k for k in result.missing_keys if not k.startswith("encoder.")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {folder} does not fit the model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def load_trainer_state(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """The resume state saved with a checkpoint: ``(tensors, meta)``, checksum-verified.

    Raises:
        CheckpointError: the checkpoint has no trainer state, or it is altered or truncated.
    """
    folder = resolve_checkpoint(path)
    meta_path = folder / TRAINER_META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no trainer state ({TRAINER_META_FILE}); it cannot be resumed")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {folder}: {TRAINER_META_FILE} is unreadable ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != TRAINER_FORMAT or not isinstance(meta.get("sha256"), str):
        raise CheckpointError(f"checkpoint {folder}: {TRAINER_META_FILE} is not a {TRAINER_FORMAT} file")
    tensors = _load_verified(folder / TRAINER_FILE, meta["sha256"], "trainer state")
    return tensors, meta.get("meta", {})


# ------------------------------------------------------------------------------------------ training state
def training_state(optimizer: torch.optim.Optimizer, device: torch.device) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The optimiser's and the random generators' state, as ``(trainer_tensors, trainer_meta)`` for
    :func:`save_checkpoint`: tensors (optimiser moments, torch/CUDA RNG) for safetensors, the rest JSON-able.
    """
    tensors: dict[str, Tensor] = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the legacy form: ("MT19937", keys, pos, has_gauss, cached_gaussian)
    meta = {
        "optim_param_groups": state["param_groups"],
        "optim_scalars": scalars,
        "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "rng_python": _to_json(random.getstate()),
    }
    return tensors, meta


def restore_training_state(
    optimizer: torch.optim.Optimizer, device: torch.device, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]
) -> None:
    """Load what :func:`training_state` saved (read back by :func:`load_trainer_state`) into ``optimizer`` and the
    torch, CUDA, NumPy and Python random generators.
    """
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value.to(device) if name != "step" else value
    for pid, values in meta["optim_scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optim_param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    kind, keys, *rest = meta["rng_numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(_from_json(meta["rng_python"]))


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"tuple": [_to_json(v) for v in value]}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and "tuple" in value:
        return tuple(_from_json(v) for v in value["tuple"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value
