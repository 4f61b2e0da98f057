"""The training loop (METHOD.md §3): one multi-class model over every category, one code path for every dataset.

The encoder is frozen and there is no augmentation, so its tapped features for every training image are computed once
and reused every epoch (the feature cache: in memory, or a disk memmap when large). Features are kept at
``train.cache_dtype`` precision with or without the cache, so both paths train the same model.

Batches follow a global permutation drawn from ``(seed, epoch)``; under ``torchrun`` each process takes its contiguous
slice of every global batch and DDP averages the gradients, so N processes train the same model as one process with
the same global batch. Checkpoints are written at epoch ends with the optimiser, RNG, epoch and step, so ``resume``
reaches the same final weights as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cnc_ad import distributed as dist
from cnc_ad.checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from cnc_ad.config import Config
from cnc_ad.data import DatasetIndex, Sample, TrainDataset, make_loader, scan_dataset
from cnc_ad.device import autocast, resolve_device
from cnc_ad.errors import CheckpointError, ConfigError, TrainingError
from cnc_ad.model import CNC, build_model
from cnc_ad.runs import RunFolder

log = logging.getLogger(__name__)

CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    checkpoint: Path
    epochs: int
    steps: int
    last_loss: dict[str, float]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def learning_rate(step: int, total_steps: int, cfg: Any) -> float:
    """Learning rate at optimiser step ``step`` (0-based): linear warm-up, then constant or cosine decay."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        floor = cfg.lr * cfg.min_lr_ratio
        return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"train.schedule={cfg.schedule!r}; use constant or cosine")


class FeatureCache:
    """Encoder features of every training image, one array per level ``(N, L, C_l)``, in memory or a disk memmap.

    Under ``torchrun`` the cache is a memmap shared by the processes of a node: each process encodes its own shard
    (every ``world_size``-th image) into the common file, then all read every row.
    """

    def __init__(self, shapes: list[tuple[int, int]], count: int, dtype: torch.dtype, path: Path | None) -> None:
        self.count = count
        self.dtype = dtype
        self.path = path
        self.valid = np.zeros(count, dtype=bool)
        np_dtype = {torch.float16: np.float16, torch.float32: np.float32}.get(dtype)
        if path is None:
            self.levels = [torch.empty((count, length, width), dtype=dtype) for length, width in shapes]
        else:
            if np_dtype is None:
                raise ConfigError("a disk feature cache needs train.cache_dtype float16 or float32")
            path.mkdir(parents=True, exist_ok=True)
            self.levels = []
            for level, (length, width) in enumerate(shapes):
                file = path / f"level{level}.npy"
                mode = "w+" if dist.is_main_process() else "r+"
                if mode == "r+":
                    dist.barrier()
                array = np.lib.format.open_memmap(file, mode=mode, dtype=np_dtype, shape=(count, length, width))
                if mode == "w+":
                    dist.barrier()
                self.levels.append(torch.from_numpy(array))

    @staticmethod
    def nbytes(shapes: list[tuple[int, int]], count: int, dtype: torch.dtype) -> int:
        return count * sum(length * width for length, width in shapes) * torch.tensor([], dtype=dtype).element_size()

    def put(self, rows: torch.Tensor, features: list[torch.Tensor]) -> None:
        for store, feature in zip(self.levels, features):
            store[rows] = feature.to("cpu", self.dtype)
        self.valid[rows.numpy()] = True

    def get(self, rows: np.ndarray, device: torch.device) -> list[torch.Tensor]:
        index = torch.from_numpy(np.sort(rows)) if self.path is not None else torch.from_numpy(rows)
        out = [store[index].to(device, non_blocking=True).float() for store in self.levels]
        if self.path is not None:  # memmap reads in sorted order; restore the batch order
            order = np.argsort(np.argsort(rows))
            out = [level[torch.from_numpy(order).to(device)] for level in out]
        return out

    def share_validity(self) -> None:
        """After each process filled its shard, make every process know every filled row."""
        if dist.world_size() > 1:
            self.valid = np.logical_or.reduce(dist.all_gather_objects(self.valid))
            dist.barrier()


class _LossModule(nn.Module):
    """Wraps the detector so DDP sees a forward() that returns the losses."""

    def __init__(self, model: CNC, lambdas: tuple[float, float, float]) -> None:
        super().__init__()
        self.model = model
        self.lambdas = lambdas

    def forward(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model.training_losses(features, *self.lambdas)


class Trainer:
    """Trains a CNC detector from a :class:`Config` into a run folder."""

    def __init__(
        self,
        config: Config,
        run_dir: str | Path,
        *,
        clip_weights: str | None = None,
        trust_pickle: bool = False,
        pretrained: bool = True,
        progress: bool = True,
        index: DatasetIndex | None = None,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.run = RunFolder(self.run_dir)
        self.progress = progress and dist.is_main_process()
        self.device = resolve_device(config.train.device)
        dist.init_from_env(self.device)
        tcfg = config.train
        if tcfg.cache_dtype not in CACHE_DTYPES:
            raise ConfigError(f"train.cache_dtype={tcfg.cache_dtype!r}; use {', '.join(CACHE_DTYPES)}")
        if tcfg.batch_size % dist.world_size():
            raise ConfigError(
                f"train.batch_size={tcfg.batch_size} (the global batch) must be divisible by the number of "
                f"processes ({dist.world_size()})"
            )
        if config.data.root is None and index is None:
            raise ConfigError("no training data: pass --data-root DIR (or set data.root in the config)")
        self.index = index or scan_dataset(
            config.data.root, config.data.format, config.data.categories, skip_bad=config.data.skip_bad
        )
        self.samples: list[Sample] = self.index.train_samples()
        if not self.samples:
            raise ConfigError(f"no normal training images found under {self.index.root}")
        seed_everything(tcfg.seed)
        self.model = build_model(
            config.model, pretrained=pretrained, clip_weights=clip_weights, trust_pickle=trust_pickle
        ).to(self.device)
        self.lambdas = (tcfg.lambda_cfd, tcfg.lambda_ngd, tcfg.lambda_moe)
        params = list(self.model.trainable_parameters())
        self.optimizer = torch.optim.Adam(params, lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay)
        self.loss_module: nn.Module = _LossModule(self.model, self.lambdas)
        if dist.is_distributed():
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # An expert that no token of a batch chose gets no gradient, hence find_unused_parameters.
            self.loss_module = nn.parallel.DistributedDataParallel(
                self.loss_module, device_ids=device_ids, find_unused_parameters=True
            )
        self.dataset = TrainDataset(self.samples, self.model.image_size)
        self._set_schedule(len(self.samples))
        self.epoch = 0
        self.step = 0
        self.resumed = False
        self.cache: FeatureCache | None = None

    def _set_schedule(self, usable: int) -> None:
        """Steps per epoch and in all, from the number of usable training images (whole global batches)."""
        tcfg = self.config.train
        if usable < tcfg.batch_size:
            raise ConfigError(
                f"{usable} usable training images, fewer than train.batch_size={tcfg.batch_size}; lower the batch size"
            )
        self.steps_per_epoch = usable // tcfg.batch_size
        total = tcfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, tcfg.max_steps) if tcfg.max_steps is not None else total

    # -- data -------------------------------------------------------------------------------------------------

    def _cache_mode(self) -> str:
        mode = self.config.train.feature_cache
        if mode not in ("auto", "memory", "disk", "off"):
            raise ConfigError(f"train.feature_cache={mode!r}; use auto, memory, disk or off")
        if mode == "off" and dist.world_size() > 1 and self.config.data.skip_bad:
            raise ConfigError(
                "with several processes, --skip-bad needs the feature cache (it finds the unreadable images once, so "
                "every process runs the same steps); drop train.feature_cache=off"
            )
        if mode != "auto":
            return "disk" if mode == "memory" and dist.world_size() > 1 else mode
        if dist.world_size() > 1:
            return "disk"
        return "memory"

    def _build_cache(self, mode: str) -> FeatureCache:
        dtype = CACHE_DTYPES[self.config.train.cache_dtype]
        probe = torch.zeros(1, 3, self.model.image_size, self.model.image_size, device=self.device)
        shapes = [(f.shape[1], f.shape[2]) for f in self.model.encode(probe)]
        size = FeatureCache.nbytes(shapes, len(self.samples), dtype)
        if (
            mode == "memory"
            and self.config.train.feature_cache == "auto"
            and size > self.config.train.cache_memory_gb * 2**30
        ):
            mode = "disk"
        path = self.run.feature_cache_dir if mode == "disk" else None
        log.info("feature cache: %s, %.2f GB for %d images", mode, size / 2**30, len(self.samples))
        cache = FeatureCache(shapes, len(self.samples), dtype, path)
        rows = np.arange(len(self.samples))[dist.rank() :: dist.world_size()]
        subset = torch.utils.data.Subset(self.dataset, rows.tolist())
        loader = make_loader(
            subset,
            self.config.eval.batch_size,
            num_workers=self.config.data.num_workers,
            skip_bad=self.config.data.skip_bad,
            generator=torch.Generator().manual_seed(self.config.train.seed),
        )
        bar = tqdm(loader, desc="caching encoder features", unit="batch", disable=not self.progress)
        with torch.no_grad(), autocast(self.device, self.config.train.amp):
            for batch in bar:
                features = self.model.encode(batch["image"].to(self.device, non_blocking=True))
                cache.put(batch["index"].long().cpu(), features)
        cache.share_validity()
        if not cache.valid.any():
            raise TrainingError("no training image could be read; see the warnings above")
        return cache

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The global order of training rows for ``epoch`` (same on every process), whole batches only."""
        generator = torch.Generator().manual_seed(self.config.train.seed * 100_003 + epoch)
        order = torch.randperm(len(self.samples), generator=generator).numpy()
        if self.cache is not None:
            order = order[self.cache.valid[order]]
        batch = self.config.train.batch_size
        return order[: len(order) // batch * batch]

    def _batches(self, epoch: int) -> Iterator[list[torch.Tensor]]:
        """This process's part of every global batch of ``epoch``, as encoder features on the device."""
        order = self._epoch_order(epoch)
        global_batch = self.config.train.batch_size
        per_rank = global_batch // dist.world_size()
        start = dist.rank() * per_rank
        mine = np.concatenate([order[k + start : k + start + per_rank] for k in range(0, len(order), global_batch)])
        dtype = CACHE_DTYPES[self.config.train.cache_dtype]
        if self.cache is not None:
            for k in range(0, len(mine), per_rank):
                yield self.cache.get(mine[k : k + per_rank], self.device)
            return
        subset = torch.utils.data.Subset(self.dataset, mine.tolist())
        loader = make_loader(
            subset,
            per_rank,
            num_workers=self.config.data.num_workers,
            skip_bad=self.config.data.skip_bad,
            generator=torch.Generator().manual_seed(self.config.train.seed + epoch),
        )
        for batch in loader:
            with torch.no_grad(), autocast(self.device, self.config.train.amp):
                features = self.model.encode(batch["image"].to(self.device, non_blocking=True))
            # Same rounding as the cache, so training does not depend on whether the cache is on.
            yield [f.to(dtype).float() for f in features]

    # -- state ------------------------------------------------------------------------------------------------

    def _save(self) -> Path:
        self.model.store_text_features()
        tensors, state = training_state(self.optimizer, self.device)
        meta = {"epoch": self.epoch, "step": self.step, **state, "config": self.config.to_dict()}
        path = None
        if dist.is_main_process():
            path = save_checkpoint(
                self.run.checkpoint_dir(self.epoch),
                self.model,
                trainer_tensors=tensors,
                trainer_meta=meta,
                run_dir=self.run_dir,
            )
        dist.barrier()
        return path or self.run_dir

    def resume(self) -> None:
        """Continue from the run folder's latest checkpoint (weights, optimiser, RNG, epoch and step)."""
        from cnc_ad.checkpoint import load_trainable_state

        checkpoint = latest_checkpoint(self.run_dir)
        load_trainable_state(self.model, checkpoint)
        tensors, meta = load_trainer_state(checkpoint)
        restore_training_state(self.optimizer, self.device, tensors, meta)
        self.epoch = int(meta["epoch"])
        self.step = int(meta["step"])
        log.info("resumed from %s (epoch %d, step %d)", checkpoint, self.epoch, self.step)
        self.resumed = True

    # -- the loop ---------------------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        tcfg = self.config.train
        if not self.resumed and self.run.has_checkpoint():
            raise ConfigError(
                f"{self.run_dir} already holds a training run; pass --resume {self.run_dir} to continue it, or choose "
                "another --out"
            )
        if dist.is_main_process():
            self.run.write_config(self.config)
            self.run.start_log(through_step=self.step if self.resumed else None)
        mode = self._cache_mode()
        if mode != "off":
            self.cache = self._build_cache(mode)
            self._set_schedule(int(self.cache.valid.sum()))
        self.model.train()
        last: dict[str, float] = {}
        checkpoint = self.run_dir
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step", disable=not self.progress)
        seen, tick = 0, time.perf_counter()
        while self.step < self.total_steps:
            start_step = self.step
            for features in self._batches(self.epoch):
                if self.step >= self.total_steps:
                    break
                lr = learning_rate(self.step, self.total_steps, tcfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                with autocast(self.device, tcfg.amp):
                    losses = self.loss_module(features)
                self._check_finite(losses)
                self.optimizer.zero_grad(set_to_none=True)
                losses["loss"].backward()
                if tcfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(self.model.trainable_parameters(), tcfg.grad_clip)
                self.optimizer.step()
                self.step += 1
                seen += features[0].shape[0] * dist.world_size()
                last = {k: float(v.detach()) for k, v in losses.items()}
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in last.items()}, refresh=False)
                if self.step % tcfg.log_every == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - tick
                    record = {"step": self.step, "epoch": self.epoch, "lr": lr, **last}
                    record["images_per_s"] = round(seen / elapsed, 3) if elapsed > 0 else None
                    if dist.is_main_process():
                        self.run.append_log(record)
                    seen, tick = 0, time.perf_counter()
            else:
                if self.step == start_step:
                    raise TrainingError(f"epoch {self.epoch} had no readable training image; see the warnings above")
                self.epoch += 1
                if self.epoch % tcfg.checkpoint_every == 0 and self.step < self.total_steps:
                    checkpoint = self._save()
                continue
            break
        bar.close()
        if self.step >= self.total_steps:
            self.epoch = max(self.epoch, math.ceil(self.step / self.steps_per_epoch))
        checkpoint = self._save()
        self._drop_cache()
        result = TrainResult(self.run_dir, checkpoint, self.epoch, self.step, last)
        if dist.is_main_process():
            self.run.write_result(checkpoint, self.epoch, self.step, last)
        return result

    def _drop_cache(self) -> None:
        """Free the feature cache; a disk cache (tens of GB for ViT-L on MVTec AD) is deleted from the run folder."""
        cache, self.cache = self.cache, None
        if cache is None or cache.path is None:
            return
        del cache.levels  # close the memmaps before deleting their files
        dist.barrier()
        if dist.is_main_process():
            shutil.rmtree(cache.path, ignore_errors=True)

    def _check_finite(self, losses: dict[str, torch.Tensor]) -> None:
        total = losses["loss"]
        finite = bool(torch.isfinite(total).all())
        if dist.is_distributed():  # every process stops together, none is left waiting in the all-reduce
            flag = torch.tensor([1.0 if finite else 0.0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            finite = bool(flag.item())
        if finite:
            return
        bad = [name for name, value in losses.items() if name != "loss" and not torch.isfinite(value).all()]
        terms = ", ".join(f"{name}={float(losses[name].detach())}" for name in bad) or f"loss={float(total.detach())}"
        try:
            good = f"the last good checkpoint is {latest_checkpoint(self.run_dir)}"
        except CheckpointError:
            good = "no checkpoint was written yet"
        raise TrainingError(
            f"non-finite loss at step {self.step + 1} ({terms}); {good}. Lower train.lr or set train.grad_clip"
        )


def train(config: Config, run_dir: str | Path, *, resume: bool = False, **kwargs: Any) -> TrainResult:
    """Train a detector as ``config`` says into ``run_dir``; with ``resume``, continue its latest checkpoint."""
    trainer = Trainer(config, run_dir, **kwargs)
    if resume:
        trainer.resume()
    return trainer.fit()
