"""The feature cache: the frozen encoder's features of every training image, computed once and read every epoch.

The encoder is frozen and training uses no augmentation, so an image's features never change. They are kept at
``train.cache_dtype`` precision, in memory or in a disk memmap (``np.lib.format.open_memmap``, one ``.npy`` file per
level). Training rounds fresh features to the same precision when the cache is off, so both paths train the same model.

Under ``torchrun`` the cache is a memmap shared by the processes of a node: each process encodes its shard (every
``world_size``-th image) into the common files, then every process reads every row.

With ``train.cache_dir`` the disk cache outlives its run: it is filled under ``<cache_dir>/<key>.partial-<run>``, then
published as ``<cache_dir>/<key>`` with a ``manifest.json`` written last, and a later run whose key matches reads it
instead of encoding. The key (:func:`kept_cache_key`) covers everything the features depend on: the encoder side of
the model config, the weights file, the precision, the device type, the package version and every training image's
path, size and modification time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from cnc_ad import distributed as dist
from cnc_ad.config import ModelConfig, TrainConfig
from cnc_ad.data import Sample, make_loader
from cnc_ad.errors import ConfigError, TrainingError
from cnc_ad.progress import progress_bar

log = logging.getLogger(__name__)

CACHE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}
MANIFEST_FILE = "manifest.json"  # a kept cache's completion mark, written last
VALID_FILE = "valid.npy"
KEPT_FORMAT = 1
# ModelConfig fields the encoder's features depend on (resolved from the preset).
ENCODER_FIELDS = ("encoder", "backbone", "pretrained", "image_size", "layers", "normalize", "token_stride")


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
        self.kept = False  # a published cache of train.cache_dir: close() leaves its files
        self.valid = np.zeros(count, dtype=bool)  # rows that hold an image's features (unreadable images do not)
        self._memmaps: list[np.memmap] = []
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
            self._memmaps.append(array)
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

    @classmethod
    def open_kept(cls, path: Path) -> FeatureCache | None:
        """The published cache in ``path``, read-only; None when there is none (or an unfinished one)."""
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("format") != KEPT_FORMAT:
            return None
        cache = cls.__new__(cls)
        cache.count = int(manifest["count"])
        cache.dtype = CACHE_DTYPES[manifest["dtype"]]
        cache.path = path
        cache.kept = True
        cache.valid = np.load(path / VALID_FILE)
        cache._memmaps = []
        cache.levels = [
            torch.from_numpy(np.load(path / f"level{level}.npy", mmap_mode="c"))  # never written
            for level in range(int(manifest["levels"]))
        ]
        return cache

    def publish(self, final: Path, key_payload: dict) -> None:
        """Make this filled disk cache the kept cache ``final`` (main process; the others wait at the barrier).

        The memmaps stay open through the rename. When another run published the same key meanwhile, this cache
        stays where it is and is deleted on :meth:`close`.
        """
        assert self.path is not None, "only a disk cache can be kept"
        if dist.is_main_process():
            for array in self._memmaps:
                array.flush()
            np.save(self.path / VALID_FILE, self.valid)
            dtype = next(name for name, value in CACHE_DTYPES.items() if value == self.dtype)
            manifest = {"format": KEPT_FORMAT, "count": self.count, "dtype": dtype, "levels": len(self.levels),
                        "key": key_payload}  # fmt: skip
            temporary = self.path / (MANIFEST_FILE + ".tmp")
            temporary.write_text(json.dumps(manifest, indent=1))
            os.replace(temporary, self.path / MANIFEST_FILE)
            if final.exists() and not (final / MANIFEST_FILE).is_file():  # damaged (kept caches appear whole)
                shutil.rmtree(final, ignore_errors=True)
            if not final.exists():
                with contextlib.suppress(OSError):  # OSError: published by another run a moment ago
                    os.replace(self.path, final)
        dist.barrier()
        if final.is_dir() and (final / MANIFEST_FILE).is_file() and not self.path.exists():
            self.path, self.kept = final, True

    def close(self) -> None:
        """Free the cache; a disk cache (tens of GB for ViT-L on MVTec AD) is deleted unless it is a kept one."""
        self.levels, self._memmaps = [], []  # close the memmaps before deleting their files
        if self.path is None or self.kept:
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


def kept_cache_key(model: ModelConfig, config: TrainConfig, samples: Sequence[Sample], device: torch.device) -> dict:
    """What a kept cache's features depend on (its folder name is a hash of this).

    Args:
        model: the resolved model config (``model.config`` of a built detector, the preset's values filled in).
        config: ``train.cache_dtype`` and ``amp`` are read.
        samples: the training images, in dataset order.
        device: where the encoder runs (CPU and CUDA kernels round differently).
    """
    from cnc_ad import __version__

    pretrained = model.pretrained
    weights = None
    if pretrained and Path(pretrained).is_file():  # a local weights file: its identity, not only its name
        stat = Path(pretrained).stat()
        weights = [str(Path(pretrained).resolve()), stat.st_size, stat.st_mtime_ns]
    images = []
    for sample in samples:
        try:
            stat = sample.image.stat()
            images.append([str(sample.image.resolve()), stat.st_size, stat.st_mtime_ns])
        except OSError:  # unreadable now: the key still changes when it comes back
            images.append([str(sample.image), None, None])
    digest = hashlib.sha256(json.dumps(images).encode()).hexdigest()
    return {
        "format": KEPT_FORMAT,
        "version": __version__,
        "encoder": {name: getattr(model, name) for name in ENCODER_FIELDS},
        "weights": weights,
        "cache_dtype": config.cache_dtype,
        "amp": config.amp,
        "device": device.type,
        "images": len(images),
        "images_sha256": digest,
    }


def kept_cache_folder(cache_dir: Path, key: dict) -> Path:
    """``<cache_dir>/<hash of key>``."""
    return cache_dir / hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


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
    kept: tuple[Path, dict] | None = None,
) -> FeatureCache:
    """Encode every training image of ``dataset`` (this process's shard) into a new cache, or open the kept one.

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
        kept: ``(folder, key)`` of a kept cache (:func:`kept_cache_folder`, :func:`kept_cache_key`): reused when it
            is published, else filled on disk beside it and published.

    Raises:
        TrainingError: no training image could be read.
    """
    mode = cache_mode(config, skip_bad)
    dtype = CACHE_DTYPES[config.cache_dtype]
    count = len(dataset)  # type: ignore[arg-type]
    if kept is not None:
        final = kept[0]
        reused = FeatureCache.open_kept(final)
        if reused is not None and reused.count == count:
            log.info("feature cache: reusing %s (%d images)", final, count)
            return reused
        mode, path = "disk", final.with_name(f"{final.name}.partial-{path.parent.name}")
        final.parent.mkdir(parents=True, exist_ok=True)
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
    if kept is not None:
        cache.publish(*kept)
        log.info("feature cache kept in %s", cache.path)
    return cache
