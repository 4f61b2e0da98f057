"""Where the work runs: the device from a config string, and mixed precision on CUDA."""

from __future__ import annotations

import contextlib

import torch

from cnc_ad import distributed as dist
from cnc_ad.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``"auto"`` picks the local CUDA device (the one ``torchrun`` assigns) when there is one, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist.local_rank())
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu or auto")
    return device


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA for ``amp`` "auto" or "bf16"; nothing otherwise."""
    if amp not in ("auto", "bf16", "off"):
        raise ConfigError(f"train.amp={amp!r}; use auto, bf16 or off")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
