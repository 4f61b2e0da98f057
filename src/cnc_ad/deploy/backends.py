"""The engines that run a trained model: PyTorch (a checkpoint), ONNX Runtime (``.onnx``) and OpenVINO (``.xml``).

Each backend scores prepared images, ``(B, 3, S, S)`` float32 RGB in [0, 1] as a NumPy array, and returns NumPy
scores ``(B,)`` and maps ``(B, M, M)``. Each imports its engine when it is opened, so that a station with ONNX
Runtime or OpenVINO never imports torch; :func:`open_backend` picks one from the source's name.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cnc_ad.deploy.metadata import (
    OUTPUT_NAMES,
    GraphInfo,
    graph_digest,
    onnx_metadata,
    openvino_bin_path,
    openvino_metadata,
    thresholds_beside,
)
from cnc_ad.errors import ConfigError, ExportError, missing_extra
from cnc_ad.thresholds import Thresholds, load_thresholds, thresholds_path

if TYPE_CHECKING:
    from cnc_ad.model import CNC

log = logging.getLogger(__name__)

# OpenVINO's CPU plugin runs in bfloat16 by default where the CPU supports it (AMX, AVX512-BF16): force float32.
OPENVINO_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}
EXPORTED_SUFFIXES = (".onnx", ".xml")


class Backend(Protocol):
    """What a :class:`cnc_ad.deploy.Detector` needs from an engine."""

    name: str  # "torch", "onnxruntime" or "openvino"
    image_size: int  # the input side S
    config: dict[str, Any]  # the model config (preset, map_size, score, ...)
    score_rule: str  # how a map becomes an image score (model.score)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prepared images (B, 3, S, S) float32 in [0, 1] -> scores (B,) and maps (B, M, M), float32."""
        ...


@dataclass
class Opened:
    """A backend opened from a source, with the thresholds stored for it, where new ones are stored, and the model's
    identity (a digest of its weights and metadata: :func:`cnc_ad.checkpoint.model_digest`,
    :func:`cnc_ad.deploy.metadata.graph_digest`).
    """

    backend: Backend
    thresholds: Thresholds | None
    thresholds_file: Path  # where `cnc calibrate` stores thresholds for this source
    source: str
    model_id: str | None = None


class TorchBackend:
    """Runs a :class:`cnc_ad.model.CNC` on one device (eval mode, fp32).

    Raises:
        TextFeaturesError: the model's text features were never stored (a model built but never trained or saved).
    """

    name = "torch"

    def __init__(self, model: CNC, device: Any) -> None:
        model.require_text_features()
        self.model = model.to(device).eval()
        self.device = device
        self.image_size = int(model.image_size)
        self.config = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.config).items()}
        self.score_rule = str(model.config.score)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        prediction = self.model.predict(batch)
        return prediction.score.float().cpu().numpy(), prediction.anomaly_map[:, 0].float().cpu().numpy()


class OnnxBackend:
    """Runs an exported graph (:func:`cnc_ad.deploy.export.export_onnx`) with ONNX Runtime."""

    name = "onnxruntime"

    def __init__(self, session: Any, info: GraphInfo) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.image_size = int(session.get_inputs()[0].shape[-1])
        self.config = info.config
        self.score_rule = info.score_rule

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feed = {self.input_name: np.ascontiguousarray(images, dtype=np.float32)}
        scores, maps = self.session.run(list(OUTPUT_NAMES), feed)
        return np.asarray(scores, np.float32), np.asarray(maps, np.float32)[:, 0]


class OpenVinoBackend:
    """Runs an exported OpenVINO IR (:func:`cnc_ad.deploy.export.export_openvino`) compiled by ``openvino.Core``."""

    name = "openvino"

    def __init__(self, compiled: Any, image_size: int, info: GraphInfo) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.outputs = tuple(compiled.output(name) for name in OUTPUT_NAMES)
        self.image_size = image_size
        self.config = info.config
        self.score_rule = info.score_rule

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self.request.infer(np.ascontiguousarray(images, dtype=np.float32))
        scores, maps = (result[output] for output in self.outputs)
        return np.array(scores, np.float32), np.array(maps, np.float32)[:, 0]


def is_exported(source: str | os.PathLike) -> bool:
    """Whether ``source`` names an exported graph (``.onnx`` or an OpenVINO ``.xml``) rather than a checkpoint."""
    return Path(source).suffix.lower() in EXPORTED_SUFFIXES


def open_backend(
    source: str | os.PathLike,
    *,
    device: str = "auto",
    clip_weights: str | None = None,
    trust_pickle: bool = False,
    pretrained: bool = True,
    providers: Sequence[str] | None = None,
    openvino_config: Mapping[str, Any] | None = None,
    threads: int | None = None,
) -> Opened:
    """Open a model for inference: a run folder or checkpoint (PyTorch), an ``.onnx`` graph (ONNX Runtime) or an
    OpenVINO ``.xml`` IR (its ``.bin`` beside it).

    Args:
        source: the model.
        device: checkpoints: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:N"``; OpenVINO: its device name
            (``"auto"`` means ``"CPU"``); ignored by ONNX Runtime (see ``providers``).
        clip_weights: checkpoints: a local CLIP weights file (offline use).
        trust_pickle: checkpoints: allow a pickle / TorchScript ``clip_weights`` file.
        pretrained: checkpoints: False builds the model's random (seeded) backbone instead of loading weights (tests).
        providers: ONNX Runtime execution providers (default: CPU).
        openvino_config: OpenVINO properties for ``compile_model``, e.g. ``{"PERFORMANCE_HINT": "THROUGHPUT"}``;
            inference runs in float32 unless ``INFERENCE_PRECISION_HINT`` is given here.
        threads: exported models: the CPU threads one inference may use (ONNX Runtime's intra-op threads, OpenVINO's
            ``INFERENCE_NUM_THREADS``); default: the engine's (all cores). PyTorch's is process-wide:
            ``torch.set_num_threads``.

    Raises:
        MissingExtra: the engine for this source is not installed.
        ExportError: an exported graph is missing, damaged or not a CNC graph.
        CheckpointError: a checkpoint is missing or damaged.
    """
    suffix = Path(source).suffix.lower()
    if suffix == ".onnx":
        return _open_onnx(Path(source), providers, threads)
    if suffix == ".xml":
        config = {**({"INFERENCE_NUM_THREADS": threads} if threads else {}), **(openvino_config or {})}
        return _open_openvino(Path(source), _openvino_device(device), config)
    return _open_checkpoint(source, device, clip_weights, trust_pickle, pretrained)


def _openvino_device(device: str) -> str:
    """OpenVINO's name for ``device``: ``auto`` and ``cpu`` are its ``CPU``; its own names (``GPU``, ``NPU``,
    ``AUTO:GPU,CPU``...) pass through upper-cased.

    Raises:
        ConfigError: a CUDA device (OpenVINO does not run on CUDA).
    """
    if device.lower() in ("auto", "cpu"):
        return "CPU"
    if device.lower().startswith("cuda"):
        raise ConfigError(f"device {device!r}: OpenVINO runs on its own devices (CPU, GPU, NPU), not CUDA")
    return device.upper()


def _open_checkpoint(
    source: str | os.PathLike, device: str, clip_weights: str | None, trust_pickle: bool, pretrained: bool
) -> Opened:
    try:
        from cnc_ad.checkpoint import load_model, model_digest, read_checkpoint_meta, resolve_checkpoint
        from cnc_ad.device import resolve_device
    except ImportError as err:
        raise missing_extra(f"running the checkpoint {source} (an exported model runs without torch)", err) from err
    folder = resolve_checkpoint(source)
    model = load_model(folder, clip_weights=clip_weights, trust_pickle=trust_pickle, pretrained=pretrained)
    backend = TorchBackend(model, resolve_device(device))
    identity = model_digest(read_checkpoint_meta(folder))
    return Opened(backend, load_thresholds(folder), thresholds_path(folder), str(folder), identity)


def _stored_thresholds(graph: Path, info: GraphInfo) -> Thresholds | None:
    """Thresholds set for an exported model after export (beside it) win over the ones embedded at export."""
    beside = thresholds_beside(graph)
    return load_thresholds(beside) if beside.is_file() else info.thresholds


def _open_onnx(path: Path, providers: Sequence[str] | None, threads: int | None) -> Opened:
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise missing_extra(f"running the ONNX model {path}", err, "station") from err
    if not path.is_file():
        raise ExportError(f"ONNX file {path} not found; export the model first (`cnc export --format onnx`)")
    try:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as err:  # onnxruntime raises its own exception types
        reason = " ".join(str(err).split())[:300]
        raise ExportError(f"ONNX Runtime cannot load {path} ({reason}); export the model again") from err
    names = {o.name for o in session.get_outputs()}
    shape = session.get_inputs()[0].shape
    if not set(OUTPUT_NAMES) <= names or len(shape) != 4 or not isinstance(shape[-1], int):
        raise ExportError(f"{path} is not a CNC graph (input (B, 3, S, S); outputs score, anomaly_map)")
    info = GraphInfo.from_metadata(onnx_metadata(session), str(path))
    backend = OnnxBackend(session, info)
    return Opened(backend, _stored_thresholds(path, info), thresholds_beside(path), str(path), graph_digest(path))


def _open_openvino(path: Path, device: str, config: Mapping[str, Any] | None) -> Opened:
    try:
        import openvino as ov
    except ImportError as err:
        raise missing_extra(f"running the OpenVINO model {path}", err, "station") from err
    for file in (path, openvino_bin_path(path)):
        if not file.is_file():
            raise ExportError(f"OpenVINO file {file} not found; write the IR with `cnc export --format openvino`")
    core = ov.Core()
    try:
        graph = core.read_model(str(path))
        compiled = core.compile_model(graph, device, {**OPENVINO_CONFIG, **(config or {})})
    except Exception as err:  # OpenVINO raises its own exception types
        reason = " ".join(str(err).split())[:300]
        raise ExportError(f"OpenVINO cannot load {path} ({reason}); re-export it with `cnc export`") from err
    names = {name for output in graph.outputs for name in output.get_names()}
    shape = graph.inputs[0].get_partial_shape() if len(graph.inputs) == 1 else None
    square = shape is not None and shape.rank.is_static and shape.rank.get_length() == 4 and shape[3].is_static
    if not set(OUTPUT_NAMES) <= names or not square or shape is None:
        raise ExportError(f"{path} is not a CNC graph (input (B, 3, S, S); outputs score, anomaly_map)")
    info = GraphInfo.from_metadata(openvino_metadata(graph), str(path))
    backend = OpenVinoBackend(compiled, shape[3].get_length(), info)
    return Opened(backend, _stored_thresholds(path, info), thresholds_beside(path), str(path), graph_digest(path))
