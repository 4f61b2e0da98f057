"""The training loop (docs/method.md, Training objective): one multi-class model over every category, one code path
for every dataset.

:func:`train` reads top to bottom: check the config, find the training images, build the model and optimiser, resume,
fill the feature cache (:mod:`cnc_ad.feature_cache`), then take :func:`train_step` on :func:`encode_batch` features (or
cached ones) until the step budget is spent, writing checkpoints at epoch ends into the run folder
(:mod:`cnc_ad.runs`). Features are kept at ``train.cache_dtype`` precision with or without the cache, so both paths
train the same model.

Batches follow a global permutation drawn from ``(seed, epoch)``; under ``torchrun`` each process takes its contiguous
slice of every global batch and DDP averages the gradients, so N processes train the same model as one process with
the same global batch. Checkpoints are written at epoch ends with the optimiser, RNG, epoch and step, so ``resume``
reaches the same final weights as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnc_ad import distributed as dist
from cnc_ad.checkpoint import (
    latest_checkpoint,
    load_trainable_state,
    load_trainer_state,
    restore_training_state,
    resumable_checkpoint,
    save_checkpoint,
    training_state,
)
from cnc_ad.config import Config, TrainConfig
from cnc_ad.data import DatasetIndex, Sample, TrainDataset, make_loader, scan_dataset
from cnc_ad.data.samples import split_calibration
from cnc_ad.device import autocast, resolve_device
from cnc_ad.errors import CheckpointError, ConfigError, TrainingError
from cnc_ad.feature_cache import (
    CACHE_DTYPES,
    FeatureCache,
    cache_mode,
    fill_feature_cache,
    kept_cache_folder,
    kept_cache_key,
)
from cnc_ad.losses import hard_mining_share
from cnc_ad.model import CNC, build_model
from cnc_ad.progress import progress_bar
from cnc_ad.runs import RunFolder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` did: the run folder, its final checkpoint, epochs and steps taken, the last loss terms, the
    trained model (eval mode), and the good training images it held out to set decision thresholds on
    (:func:`cnc_ad.deploy.calibrate.calibrate_after_training`).
    """

    run_dir: Path
    checkpoint: Path
    epochs: int
    steps: int
    last_loss: dict[str, float]
    model: CNC = field(repr=False)
    held_out: list[Sample] = field(default_factory=list, repr=False)


class NonFiniteLoss(TrainingError):
    """A loss term is NaN or infinite (``terms`` names them with their values)."""

    def __init__(self, terms: str) -> None:
        super().__init__(f"non-finite loss ({terms})")
        self.terms = terms


# ------------------------------------------------------------------------------------------------ the pieces
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def learning_rate(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate at optimiser step ``step`` (0-based): linear warm-up, then constant or cosine decay."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        floor = cfg.lr * cfg.min_lr_ratio
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr  # "constant"


class TrainingLosses(nn.Module):
    """The detector's training losses as a module (what DDP wraps): features per level -> dict with ``"loss"``."""

    def __init__(self, model: CNC, config: TrainConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config

    def forward(self, features: list[torch.Tensor], step: int = 0) -> dict[str, torch.Tensor]:
        """The losses at optimiser step ``step`` (0-based; the hard-mined share ramps with it)."""
        c = self.config
        return self.model.training_losses(
            features,
            c.lambda_cfd,
            c.lambda_ngd,
            c.lambda_moe,
            ngd=c.ngd,
            hard_share=hard_mining_share(step, c.hard_mining, c.hard_mining_steps),
            hard_factor=c.hard_mining_factor,
        )


@torch.no_grad()
def encode_batch(
    model: CNC, images: torch.Tensor, device: torch.device, amp: str, dtype: torch.dtype
) -> list[torch.Tensor]:
    """Frozen-encoder features of ``images`` ``(B, 3, S, S)``: per level ``(B, L, C)`` float32, rounded to ``dtype``.

    The rounding is the feature cache's, so training does not depend on whether the cache is on.
    """
    with autocast(device, amp):
        features = model.encode(images.to(device, non_blocking=True))
    return [f.to(dtype).float() for f in features]


def train_step(
    losses_of: Callable[[list[torch.Tensor], int], dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    features: list[torch.Tensor],
    *,
    lr: float,
    device: torch.device,
    amp: str,
    grad_clip: float | None = None,
    step: int = 0,
) -> dict[str, torch.Tensor]:
    """One optimiser step on a batch of encoder features; returns the loss terms (``"loss"`` and one per term).

    ``losses_of(features, step)`` gives the losses (a :class:`TrainingLosses`, or DDP around one); ``step`` is the
    0-based optimiser step, which schedules the hard-mined reconstruction.

    Sets the learning rate, computes the losses under autocast, checks they are finite (on every process together),
    back-propagates, clips the global gradient norm to ``grad_clip`` and steps.

    Raises:
        NonFiniteLoss: a loss term is not finite; no parameter was changed.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(device, amp):
        losses = losses_of(features, step)
    _check_finite(losses, device)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], grad_clip)
    optimizer.step()
    return losses


def _check_finite(losses: dict[str, torch.Tensor], device: torch.device) -> None:
    total = losses["loss"]
    finite = bool(torch.isfinite(total).all())
    if dist.is_distributed():  # every process stops together, none is left waiting in the all-reduce
        flag = torch.tensor([1.0 if finite else 0.0], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        finite = bool(flag.item())
    if finite:
        return
    bad = [name for name, value in losses.items() if name != "loss" and not torch.isfinite(value).all()]
    raise NonFiniteLoss(", ".join(f"{name}={float(losses[name].detach())}" for name in bad) or f"loss={float(total)}")


def training_samples(config: Config, index: DatasetIndex | None = None) -> list[Sample]:
    """The normal training images of every category of ``config.data`` (or of ``index``).

    Raises:
        ConfigError: no data root, or no training image found.
    """
    if config.data.root is None and index is None:
        raise ConfigError("no training data: set data.root to the dataset folder")
    index = index or scan_dataset(
        config.data.root, config.data.format, config.data.categories, skip_bad=config.data.skip_bad
    )
    samples = index.train_samples()
    if not samples:
        raise ConfigError(f"no normal training images found under {index.root}")
    return samples


def steps_per_epoch(usable: int, config: TrainConfig) -> int:
    """Optimiser steps per epoch (whole global batches) from the number of usable training images."""
    if usable < config.batch_size:
        raise ConfigError(
            f"{usable} usable training images, fewer than train.batch_size={config.batch_size}; lower the batch size"
        )
    return usable // config.batch_size


def total_steps(usable: int, config: TrainConfig) -> int:
    """Optimiser steps of the whole run: ``train.epochs`` epochs, at most ``train.max_steps``."""
    total = config.epochs * steps_per_epoch(usable, config)
    return min(total, config.max_steps) if config.max_steps is not None else total


def epoch_order(categories: np.ndarray, epoch: int, config: TrainConfig, valid: np.ndarray | None = None) -> np.ndarray:
    """The global order of training rows for ``epoch`` (same on every process), whole batches only.

    With ``train.category_balance`` 0 every row comes once, in a random order; with a balance ``b > 0`` as many rows
    are drawn with replacement, a row of category ``c`` with probability proportional to ``n_c ** -b`` (so category c
    gets a share proportional to ``n_c ** (1 - b)``).

    Args:
        categories: (N,) integer category of each training row.
        epoch: the epoch (with ``train.seed``, it seeds the draw).
        config: the training config.
        valid: (N,) bool, rows with features (unreadable images found while filling the cache are left out).
    """
    count = len(categories)
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    usable = np.ones(count, bool) if valid is None else valid
    if config.category_balance > 0:
        sizes = np.bincount(categories[usable], minlength=int(categories.max()) + 1).astype(np.float64)
        weights = np.where(usable, np.maximum(sizes[categories], 1.0) ** -config.category_balance, 0.0)
        draws = int(usable.sum())
        order = torch.multinomial(torch.from_numpy(weights), draws, replacement=True, generator=generator).numpy()
    else:
        order = torch.randperm(count, generator=generator).numpy()
        order = order[usable[order]]
    return order[: len(order) // config.batch_size * config.batch_size]


def feature_batches(
    model: CNC,
    dataset: TrainDataset,
    epoch: int,
    config: Config,
    device: torch.device,
    cache: FeatureCache | None,
) -> Iterator[list[torch.Tensor]]:
    """This process's part of every global batch of ``epoch``, as encoder features on ``device``."""
    tcfg = config.train
    codes = {name: k for k, name in enumerate(sorted({s.category for s in dataset.samples}))}
    categories = np.array([codes[s.category] for s in dataset.samples], np.int64)
    order = epoch_order(categories, epoch, tcfg, cache.valid if cache is not None else None)
    per_rank = tcfg.batch_size // dist.world_size()
    start = dist.rank() * per_rank
    mine = np.concatenate([order[k + start : k + start + per_rank] for k in range(0, len(order), tcfg.batch_size)])
    if cache is not None:
        for k in range(0, len(mine), per_rank):
            yield cache.get(mine[k : k + per_rank], device)
        return
    loader = make_loader(
        torch.utils.data.Subset(dataset, mine.tolist()),
        per_rank,
        num_workers=config.data.num_workers,
        skip_bad=config.data.skip_bad,
        generator=torch.Generator().manual_seed(tcfg.seed + epoch),
    )
    for batch in loader:
        yield encode_batch(model, batch["image"], device, tcfg.amp, CACHE_DTYPES[tcfg.cache_dtype])


def save_training_checkpoint(
    run: RunFolder,
    model: CNC,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    config: Config,
    epoch: int,
    step: int,
) -> Path:
    """Write the checkpoint of ``epoch`` with everything resuming needs (rank 0 writes, every process waits).

    Every process stores the text features of its prompts first (equal on every rank), so the model that training
    leaves, and the checkpoint, are ready for inference.
    """
    model.store_text_features()
    tensors, meta = training_state(optimizer, device)
    meta = {"epoch": epoch, "step": step, **meta, "config": config.to_dict()}
    path = None
    if dist.is_main_process():
        path = save_checkpoint(run.checkpoint_dir(epoch), model, trainer_tensors=tensors, trainer_meta=meta,
                               run_dir=run.path)  # fmt: skip
    dist.barrier()
    return path or run.path


# ------------------------------------------------------------------------------------------------- the loop
def train(
    config: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    clip_weights: str | None = None,
    trust_pickle: bool = False,
    pretrained: bool = True,
    progress: bool = True,
    index: DatasetIndex | None = None,
) -> TrainResult:
    """Train a detector as ``config`` says into the run folder ``run_dir``.

    Args:
        config: the whole config (``model``, ``data``, ``train``; ``eval.batch_size`` sizes the cache-filling batches).
        run_dir: the run folder (see :mod:`cnc_ad.runs`).
        resume: continue the run folder's latest checkpoint (weights, optimiser, RNG, epoch and step).
        clip_weights: local CLIP weights file.
        trust_pickle: allow a pickle / TorchScript ``clip_weights`` file.
        pretrained: False builds a random backbone (tests, benchmarks).
        progress: show progress bars (on the main process).
        index: the dataset, already scanned (default: scan ``config.data``).

    Raises:
        ConfigError: an invalid setting, no training data, or ``run_dir`` already holds a run (without ``resume``).
        TrainingError: a non-finite loss (the last good checkpoint stays), or no readable training image.
    """
    tcfg = config.train
    run = RunFolder(run_dir)
    device = resolve_device(tcfg.device)
    dist.init_from_env(device)
    progress = progress and dist.is_main_process()
    if tcfg.batch_size % dist.world_size():
        raise ConfigError(
            f"train.batch_size={tcfg.batch_size} (the global batch) must be divisible by the number of "
            f"processes ({dist.world_size()})"
        )
    # Good images kept aside to set decision thresholds on after training (by the callers: cnc_ad.deploy.calibrate).
    samples, held_out = split_calibration(
        training_samples(config, index), config.data.calibration_share, config.data.calibration_min
    )
    total = total_steps(len(samples), tcfg)
    if not resume and run.has_checkpoint():
        raise ConfigError(
            f"{run.path} already holds a training run; continue it (resume=True), or choose another run folder"
        )

    seed_everything(tcfg.seed)
    model = build_model(config.model, pretrained=pretrained, clip_weights=clip_weights, trust_pickle=trust_pickle)
    model = model.to(device)
    optimizer = torch.optim.Adam(
        list(model.trainable_parameters()), lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay
    )
    losses_of: nn.Module = TrainingLosses(model, tcfg)
    if dist.is_distributed():
        device_ids = [device.index] if device.type == "cuda" else None
        # An expert that no token of a batch chose gets no gradient, hence find_unused_parameters.
        losses_of = nn.parallel.DistributedDataParallel(losses_of, device_ids=device_ids, find_unused_parameters=True)
    dataset = TrainDataset(samples, model.image_size)
    epoch = step = 0
    checkpoint = None
    if resume:
        if dist.is_main_process():
            for leftover in run.remove_crash_leftovers():
                log.info("removed %s, left by an interrupted save", leftover)
        dist.barrier()
        checkpoint = resumable_checkpoint(run.path)
    if checkpoint is not None:
        load_trainable_state(model, checkpoint)
        tensors, meta = load_trainer_state(checkpoint)
        restore_training_state(optimizer, device, tensors, meta)
        epoch, step = int(meta["epoch"]), int(meta["step"])
        log.info("resumed from %s (epoch %d, step %d)", checkpoint, epoch, step)
    elif resume:  # interrupted before its first checkpoint was complete: the same run again from step 0
        log.warning("%s has no complete checkpoint yet: training starts again from step 0 with its config", run.path)
        resume = False

    if dist.is_main_process():
        run.write_config(config)
        run.start_log(through_step=step if resume else None)
    cache = None
    if cache_mode(tcfg, config.data.skip_bad) != "off":
        kept = None
        if tcfg.cache_dir is not None:
            key = kept_cache_key(model.config, tcfg, samples, device)
            kept = (kept_cache_folder(Path(tcfg.cache_dir).expanduser(), key), key)
        cache = fill_feature_cache(
            lambda images: encode_batch(model, images, device, tcfg.amp, CACHE_DTYPES[tcfg.cache_dtype]),
            dataset,
            tcfg,
            image_size=model.image_size,
            device=device,
            path=run.feature_cache_dir,
            batch_size=config.eval.batch_size,
            num_workers=config.data.num_workers,
            skip_bad=config.data.skip_bad,
            progress=progress,
            kept=kept,
        )
        total = total_steps(int(cache.valid.sum()), tcfg)

    model.train()
    last: dict[str, float] = {}
    checkpoint = run.path
    bar = progress_bar(total=total, initial=step, desc="training", unit="step", enabled=progress)
    seen, tick = 0, time.perf_counter()
    while step < total:
        start_step = step
        for features in feature_batches(model, dataset, epoch, config, device, cache):
            if step >= total:
                break
            lr = learning_rate(step, total, tcfg)
            try:
                losses = train_step(losses_of, optimizer, features, lr=lr, device=device, amp=tcfg.amp,
                                    grad_clip=tcfg.grad_clip, step=step)  # fmt: skip
            except NonFiniteLoss as err:
                raise TrainingError(
                    f"non-finite loss at step {step + 1} ({err.terms}); {_last_good(run)}. Lower train.lr or set "
                    "train.grad_clip"
                ) from None
            step += 1
            seen += features[0].shape[0] * dist.world_size()
            last = {k: float(v.detach()) for k, v in losses.items()}  # every loss term is logged
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in last.items() if not k.startswith("diag_")}, refresh=False)
            if step % tcfg.log_every == 0 or step == total:
                elapsed = time.perf_counter() - tick
                record: dict[str, float | None] = {"step": step, "epoch": epoch, "lr": lr, **last}
                record["images_per_s"] = round(seen / elapsed, 3) if elapsed > 0 else None
                if dist.is_main_process():
                    run.append_log(record)
                seen, tick = 0, time.perf_counter()
        else:  # the epoch ran to its end
            if step == start_step:
                raise TrainingError(f"epoch {epoch} had no readable training image; see the warnings above")
            epoch += 1
            if epoch % tcfg.checkpoint_every == 0 and step < total:
                checkpoint = save_training_checkpoint(run, model, optimizer, device, config, epoch, step)
            continue
        break  # the step budget ended inside an epoch
    bar.close()
    if step >= total:
        usable = int(cache.valid.sum()) if cache is not None else len(samples)
        epoch = max(epoch, math.ceil(step / steps_per_epoch(usable, tcfg)))
    checkpoint = save_training_checkpoint(run, model, optimizer, device, config, epoch, step)
    if cache is not None:
        cache.close()
    if dist.is_main_process():
        run.write_result(checkpoint, epoch, step, last)
    dist.barrier()
    return TrainResult(run.path, checkpoint, epoch, step, last, model.eval(), held_out)


def _last_good(run: RunFolder) -> str:
    try:
        return f"the last good checkpoint is {latest_checkpoint(run.path)}"
    except CheckpointError:
        return "no checkpoint was written yet"
