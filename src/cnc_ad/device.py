"""Where the work runs: the device from a config string, and mixed precision on CUDA."""

from __future__ import annotations

import contextlib
import os

import torch

from cnc_ad import distributed as dist
from cnc_ad.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """The device for ``name``: "auto" is CUDA when there is one, else the CPU.

    Under ``torchrun`` a CUDA device without an index ("auto", "cuda") is the process's own GPU (``LOCAL_RANK``).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here; use device=cpu or device=auto")
    if device.index is None:
        device = torch.device("cuda", dist.local_rank() if dist.launched_by_torchrun() else torch.cuda.current_device())
    elif dist.launched_by_torchrun() and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"device {name!r} under torchrun would put every process on one GPU; use device=cuda")
    if device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for ``amp`` "auto" or "bf16"; nothing otherwise."""
    if amp not in ("auto", "bf16", "off"):
        raise ConfigError(f"train.amp={amp!r}; use auto, bf16 or off")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
