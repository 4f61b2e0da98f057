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
