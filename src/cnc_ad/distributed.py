"""torch.distributed helpers: process rank, world size, set-up under ``torchrun``, sharding and reductions.

Every function works unchanged in a single process (rank 0 of a world of 1), so callers need no special case. torch is
imported only by the functions that need a process group: a process that never imported torch (a station running an
exported model) is a world of one, and reading the rank does not import it.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def is_distributed() -> bool:
    if "torch.distributed" not in sys.modules:  # nothing imported torch.distributed, so no group was set up
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    if not is_distributed():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def world_size() -> int:
    if not is_distributed():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def is_main_process() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> None:
    """Join the process group that ``torchrun`` describes in the environment (NCCL on CUDA, gloo on CPU)."""
    if is_distributed() or not launched_by_torchrun():
        return
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def shard(items: Sequence[T]) -> list[T]:
    """This process's share of ``items``: every ``world_size``-th item starting at ``rank``."""
    return list(items[rank() :: world_size()])


def all_gather_objects(obj: T) -> list[T]:
    """Gather one picklable object per process, in rank order (a list of one item in a single process)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def cleanup() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()
