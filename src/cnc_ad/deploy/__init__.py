"""Deployment: a trained model put to work on new images, with or without torch.

- :mod:`~cnc_ad.deploy.detector`: :class:`Detector`, the one path from an input to a decision (``Detector.load`` opens
  a checkpoint, an ONNX graph or an OpenVINO IR);
- :mod:`~cnc_ad.deploy.inputs`: the one place that turns files, uploads, arrays and images into model inputs;
- :mod:`~cnc_ad.deploy.backends`: the engines (PyTorch, ONNX Runtime, OpenVINO);
- :mod:`~cnc_ad.deploy.tiling`: large images scored by tiles;
- :mod:`~cnc_ad.deploy.calibrate`: thresholds from good parts only;
- :mod:`~cnc_ad.deploy.predict` and :mod:`~cnc_ad.deploy.watch`: files and watched folders into a results folder;
- :mod:`~cnc_ad.deploy.serve`: the HTTP server;
- :mod:`~cnc_ad.deploy.export` (needs torch) and :mod:`~cnc_ad.deploy.metadata`: exported graphs and what they say
  about themselves.

Everything but ``export`` (and a checkpoint's backend) runs with NumPy and Pillow only: ``pip install
'cnc-ad[station]'`` gives a line PC the exported-model path without the training stack.
"""

from __future__ import annotations

from cnc_ad.deploy.detector import DetectionResult, Detector, ImageResult, Outcome
from cnc_ad.deploy.tiling import Tiling

__all__ = ["DetectionResult", "Detector", "ImageResult", "Outcome", "Tiling"]
