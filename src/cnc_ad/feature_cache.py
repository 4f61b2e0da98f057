"""The feature cache: the frozen encoder's features of every training image, computed once and read every epoch.

The encoder is frozen and training uses no augmentation, so an image's features never change. They are kept at
``train.cache_dtype`` precision, in memory or in a disk memmap (``np.lib.format.open_memmap``, one ``.npy`` file per
level). Training rounds fresh features to the same precision when the cache is off, so both paths train the same model.

Under ``torchrun`` the cache is a memmap shared by the processes of a node: each process encodes its shard (every
``world_size``-th image) into the common files, then every process reads every row.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from cnc_ad import distributed as dist
from cnc_ad.config import TrainConfig
from cnc_ad.data import make_loader
from cnc_ad.errors import ConfigError, TrainingError
from cnc_ad.progress import progress_bar

log = logging.getLogger(__name__)

CACHE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


class FeatureCache:
    """Encoder features of ``count`` images, one array per level ``(count, L_l, C_l)``, in memory or a disk memmap.

    Args:
        shapes: ``(L_l, C_l)`` tokens and channels per level.
        count: number of images (rows).
        dtype: storage precision; a disk cache needs float16 or float32.
        path: folder of the memmap files; None keeps the cache in memory.
    """

    def __init__(self, shapes: list[tuple[int, int]], count: int, dtype: torch.dtype, path: Path | None) -> None:
        self.count = count
        self.dtype = dtype
        self.path = path
        self.valid = np.zeros(count, dtype=bool)  # rows that hold an image's features (unreadable images do not)
        if path is None:
            self.levels = [torch.empty((count, length, width), dtype=dtype) for length, width in shapes]
            return
        np_dtype = _NUMPY_DTYPES.get(dtype)
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
        """Bytes the cache of ``count`` images takes."""
        return count * sum(length * width for length, width in shapes) * torch.tensor([], dtype=dtype).element_size()

    def put(self, rows: torch.Tensor, features: list[torch.Tensor]) -> None:
        """Store the features ``(B, L_l, C_l)`` per level of the images ``rows`` ``(B,)``."""
        for store, feature in zip(self.levels, features, strict=True):
            store[rows] = feature.to("cpu", self.dtype)
        self.valid[rows.numpy()] = True

    def get(self, rows: np.ndarray, device: torch.device) -> list[torch.Tensor]:
        """The features of ``rows`` ``(B,)`` in that order, as float32 ``(B, L_l, C_l)`` on ``device``."""
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

    def close(self) -> None:
        """Free the cache; a disk cache (tens of GB for ViT-L on MVTec AD) is deleted."""
        self.levels = []  # close the memmaps before deleting their files
        if self.path is None:
            return
        dist.barrier()
        if dist.is_main_process():
            shutil.rmtree(self.path, ignore_errors=True)


def cache_mode(config: TrainConfig, skip_bad: bool) -> Literal["memory", "disk", "off"]:
    """Where the cache lives for ``train.feature_cache`` (before the size check of ``"auto"``).

    Raises:
        ConfigError: several processes, unreadable images skipped, and no cache (every process must run the same
            steps, so the unreadable images must be found once, while filling the cache).
    """
    mode = config.feature_cache
    if mode == "off" and dist.world_size() > 1 and skip_bad:
        raise ConfigError(
            "with several processes, skipping unreadable images (data.skip_bad) needs the feature cache: it finds "
            "them once, so every process runs the same steps; drop train.feature_cache=off"
        )
    if mode == "off":
        return "off"
    if mode == "disk" or dist.world_size() > 1:  # processes share a memmap, never separate memory copies
        return "disk"
    return "memory"


def fill_feature_cache(
    encode: Callable[[torch.Tensor], list[torch.Tensor]],
    dataset: Dataset,
    config: TrainConfig,
    *,
    image_size: int,
    device: torch.device,
    path: Path,
    batch_size: int,
    num_workers: int,
    skip_bad: bool,
    progress: bool = True,
) -> FeatureCache:
    """Encode every training image of ``dataset`` (this process's shard) into a new cache.

    Args:
        encode: images ``(B, 3, S, S)`` -> features per level (:func:`cnc_ad.train.encode_batch`).
        dataset: yields ``{"image", "index"}`` items (:class:`cnc_ad.data.TrainDataset`).
        config: ``train.feature_cache``, ``cache_dtype``, ``cache_memory_gb`` and ``seed`` are read.
        image_size: the model's input side S.
        device: where the encoder runs.
        path: the folder of a disk cache.
        batch_size: images per encoder call.
        num_workers: image decoding processes.
        skip_bad: leave unreadable images out (their rows stay invalid) instead of stopping.
        progress: show a progress bar.

    Raises:
        TrainingError: no training image could be read.
    """
    mode = cache_mode(config, skip_bad)
    dtype = CACHE_DTYPES[config.cache_dtype]
    count = len(dataset)  # type: ignore[arg-type]
    probe = torch.zeros(1, 3, image_size, image_size, device=device)
    shapes = [(f.shape[1], f.shape[2]) for f in encode(probe)]
    size = FeatureCache.nbytes(shapes, count, dtype)
    if mode == "memory" and config.feature_cache == "auto" and size > config.cache_memory_gb * 2**30:
        mode = "disk"
    log.info("feature cache: %s, %.2f GB for %d images", mode, size / 2**30, count)
    cache = FeatureCache(shapes, count, dtype, path if mode == "disk" else None)
    rows = np.arange(count)[dist.rank() :: dist.world_size()]
    loader = make_loader(
        Subset(dataset, rows.tolist()),
        batch_size,
        num_workers=num_workers,
        skip_bad=skip_bad,
        generator=torch.Generator().manual_seed(config.seed),
    )
    for batch in progress_bar(loader, desc="caching encoder features", unit="batch", enabled=progress):
        cache.put(batch["index"].long().cpu(), encode(batch["image"]))
    cache.share_validity()
    if not cache.valid.any():
        raise TrainingError("no training image could be read; see the warnings above")
    return cache
