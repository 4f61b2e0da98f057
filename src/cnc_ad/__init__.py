"""cnc_ad: CNC (Cross-modal Normality Constraint, Wang et al., AAAI 2025) for multi-class anomaly detection.

The importable library. The command-line program lives in :mod:`cnc_ad.cli`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from cnc_ad.inference import Detector

__all__ = ["Detector", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import cnc_ad` stays cheap (no torch import) for the CLI's --help and --version.
    if name == "Detector":
        from cnc_ad.inference import Detector

        return Detector
    raise AttributeError(f"module 'cnc_ad' has no attribute {name!r}")
