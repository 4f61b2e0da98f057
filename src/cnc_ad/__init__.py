"""cnc_ad: CNC (Cross-modal Normality Constraint, Wang et al., AAAI 2025) for multi-class anomaly detection.

The importable library. The command-line program lives in :mod:`cnc_ad.cli`; using a trained model, in
:mod:`cnc_ad.deploy`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

if TYPE_CHECKING:
    from cnc_ad.deploy import Detector

__all__ = ["Detector", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy so that `import cnc_ad` stays cheap for the CLI's --help and --version.
    if name == "Detector":
        from cnc_ad.deploy import Detector

        return Detector
    raise AttributeError(f"module 'cnc_ad' has no attribute {name!r}")
