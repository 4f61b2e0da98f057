"""What an exported graph says about itself: the ``cnc_ad.*`` metadata, written by :mod:`cnc_ad.deploy.export` and
read back by :class:`cnc_ad.deploy.Detector` (this module is the only one that names the keys). Torch-free.

Both formats carry the same string keys: ONNX as ``metadata_props``, OpenVINO IR as ``rt_info``.

- ``cnc_ad.version``: the package version that exported the graph;
- ``cnc_ad.config``: the model config (JSON; ``score`` is the image score rule, ``preset`` and ``map_size`` are shown
  by the server);
- ``cnc_ad.input``: a description of the input;
- ``cnc_ad.thresholds``: the thresholds stored beside the checkpoint at export (JSON, :mod:`cnc_ad.thresholds`);
- ``cnc_ad.checkpoint``: the checkpoint it was exported from.

Thresholds set later for an exported model (``cnc calibrate --model model.onnx``) cannot go into the graph file; they
are stored beside it, in ``<stem>.thresholds.json`` (:func:`thresholds_beside`), and take precedence over the embedded
ones when the model is loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnc_ad import __version__
from cnc_ad.files import sha256_file
from cnc_ad.thresholds import DIGEST_CHARS, Thresholds

PREFIX = "cnc_ad."
VERSION_KEY = "cnc_ad.version"
CONFIG_KEY = "cnc_ad.config"
INPUT_KEY = "cnc_ad.input"
THRESHOLDS_KEY = "cnc_ad.thresholds"
CHECKPOINT_KEY = "cnc_ad.checkpoint"
INPUT_NAME = "images"
OUTPUT_NAMES = ("score", "anomaly_map")


def graph_metadata(
    config: Mapping[str, Any],
    image_size: int,
    *,
    thresholds: Thresholds | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> dict[str, str]:
    """The metadata an export writes (key -> string value).

    Args:
        config: the model config as a mapping (tuples become lists).
        image_size: the input side S.
        thresholds: the thresholds to embed, if any.
        checkpoint: the checkpoint exported, if any.
    """
    values = {
        VERSION_KEY: __version__,
        CONFIG_KEY: json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}),
        INPUT_KEY: f"{INPUT_NAME}: (B, 3, {image_size}, {image_size}) float32 RGB in [0, 1], not normalised",
    }
    if thresholds is not None:
        values[THRESHOLDS_KEY] = json.dumps(thresholds.to_json())
    if checkpoint is not None:
        values[CHECKPOINT_KEY] = os.fspath(checkpoint)
    return values


@dataclass(frozen=True)
class GraphInfo:
    """The metadata of an exported graph, read back.

    Attributes:
        config: the model config (empty when the graph carries none).
        thresholds: the embedded thresholds, or None.
        version: the exporting package's version ("" when unknown).
        checkpoint: the checkpoint it came from ("" when unknown).
    """

    config: dict[str, Any] = field(default_factory=dict)
    thresholds: Thresholds | None = None
    version: str = ""
    checkpoint: str = ""

    @property
    def score_rule(self) -> str:
        """How the graph turns a map into an image score (``model.score``; ``"max"`` when absent)."""
        rule = self.config.get("score")
        return rule if isinstance(rule, str) and rule else "max"

    @classmethod
    def from_metadata(cls, values: Mapping[str, str], source: str) -> GraphInfo:
        """Parse the ``cnc_ad.*`` values of a graph (unknown keys are ignored; a malformed config reads as empty).

        Raises:
            DataError: the embedded thresholds are malformed.
        """
        try:
            config = json.loads(values.get(CONFIG_KEY, "{}"))
        except ValueError:
            config = {}
        thresholds = None
        if values.get(THRESHOLDS_KEY):
            thresholds = Thresholds.from_json(json.loads(values[THRESHOLDS_KEY]), source=f"{source} metadata")
        return cls(
            config if isinstance(config, dict) else {},
            thresholds,
            values.get(VERSION_KEY, ""),
            values.get(CHECKPOINT_KEY, ""),
        )


def onnx_metadata(session: Any) -> dict[str, str]:
    """The ``cnc_ad.*`` metadata of an ``onnxruntime.InferenceSession``."""
    values = session.get_modelmeta().custom_metadata_map
    return {key: value for key, value in values.items() if key.startswith(PREFIX)}


def openvino_metadata(model: Any) -> dict[str, str]:
    """The ``cnc_ad.*`` metadata of an IR read with ``openvino.Core().read_model``."""
    keys = [key for key in model.get_rt_info().keys() if key.startswith(PREFIX)]  # noqa: SIM118 (an RTMap)
    return {key: model.get_rt_info(key).astype(str) for key in keys}


def openvino_bin_path(xml_path: str | os.PathLike) -> Path:
    """The weights file (``.bin``) OpenVINO reads beside an IR's ``.xml``."""
    return Path(xml_path).with_suffix(".bin")


def thresholds_beside(graph: str | os.PathLike) -> Path:
    """Where thresholds set for an exported model are stored: ``<stem>.thresholds.json`` beside the graph file."""
    path = Path(graph)
    return path.with_name(f"{path.stem}.thresholds.json")


def graph_digest(graph: str | os.PathLike) -> str:
    """The identity of an exported model: 16 hex digits of the SHA-256 of its file (for OpenVINO IR, of the ``.xml``
    and then the ``.bin``), metadata and weights alike.
    """
    path = Path(graph)
    files = (path, openvino_bin_path(path)) if path.suffix.lower() == ".xml" else (path,)
    return sha256_file(*files)[:DIGEST_CHARS]
