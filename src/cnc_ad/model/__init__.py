"""The CNC model: frozen encoders, prompts, gated MoE, decoder, anomaly maps, presets (docs/method.md: Model,
Training objective, Inference).

Start at :mod:`cnc_ad.model.cnc` (the composed model) and :func:`build_model` (presets -> model).
"""

from __future__ import annotations

from cnc_ad.model.cnc import CNC, CNCOutput, Prediction
from cnc_ad.model.presets import PRESETS, Preset, build_model, resolve_config

__all__ = ["CNC", "PRESETS", "CNCOutput", "Prediction", "Preset", "build_model", "resolve_config"]
