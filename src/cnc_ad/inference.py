"""Using a trained CNC model on new images: the :class:`Detector` Python API and its input handling.

Every input goes through the data layer's preprocessing (:func:`cnc_ad.data.transforms.prepare_image`, the ADer
protocol: bilinear resize of the whole image to ``S x S``), so training, evaluation and prediction see identical
pixels. The model's ``M x M`` anomaly map is resized (bilinear) back to each input's own size. The same API runs a
checkpoint with PyTorch (:meth:`Detector.from_checkpoint`) or an exported graph with onnxruntime
(:meth:`Detector.from_onnx`, see :mod:`cnc_ad.export`).

Decisions use the F1-max thresholds that evaluation stores beside the checkpoint (:mod:`cnc_ad.results`) or explicit
ones; an image is anomalous when ``score >= threshold``, a pixel when ``map >= pixel threshold``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np
import torch
from PIL import Image

from cnc_ad.data.dataset import ImageFileDataset
from cnc_ad.data.images import decode_image
from cnc_ad.data.transforms import prepare_image, to_tensor
from cnc_ad.errors import ConfigError, DataError, ExportError
from cnc_ad.results import ALL, Kind, Thresholds, load_thresholds
from cnc_ad.visualize import resize_map

if TYPE_CHECKING:
    from cnc_ad.model import CNC

_ARRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "F")
TILES_RULE = ";tiles"  # a threshold rule set on tiled scores ends with ";tiles=<px>/<overlap>"
THRESHOLDS_METADATA = "cnc_ad.thresholds"  # the ONNX metadata key of the embedded thresholds

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor
# A backend scores preprocessed images (B, 3, S, S) in [0, 1]: -> scores (B,) and maps (B, M, M), float32 NumPy.
Backend = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]


class DetectionResult(NamedTuple):
    """What :meth:`Detector.predict` returns, one entry per input image (B of them).

    ``maps`` and ``masks`` are lists because inputs may differ in size: entry ``i`` has input ``i``'s own
    ``(H_i, W_i)``. ``masks`` is None when no pixel threshold is known; ``is_anomalous`` is None when no image
    threshold is known.
    """

    scores: np.ndarray  # (B,) float32 image anomaly scores
    maps: list[np.ndarray]  # B float32 anomaly maps (H_i, W_i), bilinear from the model's M x M map
    masks: list[np.ndarray] | None  # B bool masks (H_i, W_i): map >= pixel threshold
    is_anomalous: np.ndarray | None  # (B,) bool: score >= image threshold


# ----------------------------------------------------------------------------------------------------- inputs
def _array_to_image(array: np.ndarray) -> Image.Image:
    """An RGB Pillow image from an (H, W) or (H, W, C) array: uint8, uint16, bool, or float in [0, 1]."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise DataError(f"an image array must be (H, W) or (H, W, C) with C in 1, 3, 4; got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.round(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min(initial=0.0) < 0.0 or array.max(initial=0.0) > 1.0:
            raise DataError("a float image array must hold finite values in [0, 1]; divide uint8 data by 255")
        array = np.round(array * 255.0).astype(np.uint8)  # 8 bits, like image files: one resize path for all
    elif array.dtype != np.uint8:
        raise DataError(f"image arrays must be uint8, uint16, bool or float in [0, 1]; got {array.dtype}")
    image = Image.fromarray(np.ascontiguousarray(array))
    return image if image.mode == "RGB" else image.convert("RGB")


def _tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """An RGB Pillow image from a (3, H, W) float tensor in [0, 1]."""
    if tensor.ndim != 3 or tensor.shape[0] != 3 or not tensor.is_floating_point():
        raise DataError(f"image tensors must be (3, H, W) float RGB in [0, 1]; got {tuple(tensor.shape)}")
    return _array_to_image(tensor.detach().float().cpu().permute(1, 2, 0).numpy())


def _flatten_inputs(x: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(x, torch.Tensor):
        if x.ndim == 4:
            return list(x)
        if x.ndim == 3:
            return [x]
        raise DataError(f"image tensors must be (B, 3, H, W) or (3, H, W); got {tuple(x.shape)}")
    if isinstance(x, (list, tuple)):
        return list(x)
    return [cast(ImageInput, x)]  # any other value is one input (a str path is not a sequence of inputs)


# ---------------------------------------------------------------------------------------------------- backends
class TorchBackend:
    """Runs a :class:`cnc_ad.model.CNC` on one device (eval mode, fp32).

    Raises:
        TextFeaturesError: the model's text features were never stored (a model built but never trained or saved).
    """

    def __init__(self, model: CNC, device: torch.device) -> None:
        model.require_text_features()
        self.model = model.to(device).eval()
        self.device = device

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        prediction = self.model.predict(images.to(self.device, torch.float32))
        return prediction.score.float().cpu().numpy(), prediction.anomaly_map[:, 0].float().cpu().numpy()


class OnnxBackend:
    """Runs an exported graph (:func:`cnc_ad.export.export_onnx`) with onnxruntime."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        feed = {self.input_name: images.detach().to("cpu", torch.float32).contiguous().numpy()}
        scores, maps = self.session.run(["score", "anomaly_map"], feed)
        return np.asarray(scores, np.float32), np.asarray(maps, np.float32)[:, 0]


class OpenVinoBackend:
    """Runs an exported OpenVINO IR (:func:`cnc_ad.export.export_openvino`) compiled by ``openvino.Core``."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.outputs = (compiled.output("score"), compiled.output("anomaly_map"))

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        result = self.request.infer(images.detach().to("cpu", torch.float32).contiguous().numpy())
        scores, maps = (result[output] for output in self.outputs)
        return np.array(scores, np.float32), np.array(maps, np.float32)[:, 0]


# ---------------------------------------------------------------------------------------------------- detector
@dataclass(frozen=True)
class Tiling:
    """Score each image by overlapping square tiles of ``tile`` pixels (at the image's own resolution), each resized
    to the model's input, their maps stitched into one (:mod:`cnc_ad.tiling`): for large images with small defects.

    Raises:
        ConfigError: a tile under 1 pixel, or an overlap outside [0, 1).
    """

    tile: int
    overlap: float = 0.25

    def __post_init__(self) -> None:
        if self.tile < 1:
            raise ConfigError(f"tile side {self.tile}: give a positive number of pixels, e.g. --tile 512")
        if not 0.0 <= self.overlap < 1.0:
            raise ConfigError(f"tile overlap {self.overlap}: give a share in [0, 1), e.g. --tile-overlap 0.25")

    def describe(self) -> str:
        return f"{self.tile} px tiles, overlap {self.overlap:g}"

    def rule_suffix(self) -> str:
        """What a threshold set with these tiles adds to its rule (``";tiles=512/0.25"``)."""
        return f"{TILES_RULE}={self.tile}/{self.overlap:g}"


def _in_memory_to_rgb(image: ImageInput) -> Image.Image:
    """A tensor, Pillow image or array input as an RGB Pillow image (16-bit and float images scaled like arrays).

    Raises:
        DataError: an unsupported input type or array.
    """
    if isinstance(image, torch.Tensor):
        return _tensor_to_image(image)
    if isinstance(image, Image.Image):
        if image.mode in _ARRAY_MODES:  # 16-bit and float images: scaled like arrays of the same dtype
            return _array_to_image(np.asarray(image))
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        return _array_to_image(image)
    raise DataError(f"cannot predict on a {type(image).__name__}; pass a path, PIL image, array or tensor")


def _score_rule(meta: Mapping[str, str]) -> str:
    """The image score rule an exported graph records in its config metadata (``"max"`` when absent)."""
    try:
        rule = json.loads(meta.get("cnc_ad.config", "{}")).get("score")
    except (ValueError, AttributeError):
        rule = None
    return rule if isinstance(rule, str) and rule else "max"


class Detector:
    """A trained model ready to score images: preprocessing, inference, maps at the input size and decisions.

    Build it with :meth:`from_checkpoint` (PyTorch), :meth:`from_onnx` (onnxruntime) or :meth:`from_openvino`; all
    behave the same.

    Args:
        backend: scores preprocessed images (B, 3, S, S) in [0, 1] -> (scores (B,), maps (B, M, M)).
        image_size: the model's input side S in pixels.
        thresholds: the stored thresholds (a :class:`~cnc_ad.results.Thresholds`, or a ``thresholds.json``
            mapping), or None.
        source: where the model came from (for messages).
        score_rule: how the model turns a map into an image score (``model.score``); tiled scoring applies it to
            the stitched map.
        tiling: score every image by tiles (:class:`Tiling`) instead of resizing it whole to the model's input.
    """

    def __init__(
        self,
        backend: Backend,
        image_size: int,
        thresholds: Thresholds | Mapping[str, Any] | None = None,
        source: str = "",
        score_rule: str = "max",
        tiling: Tiling | None = None,
    ) -> None:
        self.backend = backend
        self.image_size = image_size
        self.thresholds = Thresholds.from_json(thresholds) if isinstance(thresholds, Mapping) else thresholds
        self.source = source
        self.score_rule = score_rule
        self.tiling = tiling

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device = "auto",
        clip_weights: str | None = None,
        trust_pickle: bool = False,
        pretrained: bool = True,
    ) -> Detector:
        """Load a checkpoint (or a run folder's latest) and the thresholds stored beside it.

        Args:
            path: checkpoint folder, run folder or ``RUN/last``.
            device: ``"auto"`` (CUDA when available, else CPU), or any torch device.
            clip_weights: local CLIP weights file (offline use).
            trust_pickle: allow a pickle / TorchScript ``clip_weights`` file.
            pretrained: False builds the model's random (seeded) backbone instead of loading weights (tests).
        """
        from cnc_ad.checkpoint import load_model, resolve_checkpoint
        from cnc_ad.device import resolve_device

        folder = resolve_checkpoint(path)
        device = resolve_device(device) if isinstance(device, str) else device
        model = load_model(folder, clip_weights=clip_weights, trust_pickle=trust_pickle, pretrained=pretrained)
        return cls(
            TorchBackend(model, device), model.image_size, load_thresholds(folder), str(folder), model.config.score
        )

    @classmethod
    def from_onnx(
        cls,
        path: str | os.PathLike,
        *,
        thresholds: Thresholds | Mapping[str, Any] | str | os.PathLike | None = None,
        providers: Sequence[str] | None = None,
    ) -> Detector:
        """Load a graph written by :func:`cnc_ad.export.export_onnx`.

        Args:
            path: the ``.onnx`` file.
            thresholds: thresholds, or a thresholds file; default: the thresholds embedded at export (the
                checkpoint's), if any.
            providers: onnxruntime execution providers (default: CPU).

        Raises:
            ExportError: the file is missing or not a CNC graph.
        """
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise ExportError(f"running an ONNX model needs onnxruntime ({err}); pip install 'cnc-ad[export]'") from err

        path = Path(path)
        if not path.is_file():
            raise ExportError(f"ONNX file {path} not found; export the model first (cnc_ad.export.export_onnx)")
        try:
            session = ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as err:  # onnxruntime raises its own exception types
            raise ExportError(f"onnxruntime cannot load {path} ({err}); export the model again") from err
        names = {o.name for o in session.get_outputs()}
        shape = session.get_inputs()[0].shape
        if not {"score", "anomaly_map"} <= names or len(shape) != 4 or not isinstance(shape[-1], int):
            raise ExportError(f"{path} is not a CNC graph (input (B, 3, S, S); outputs score, anomaly_map)")
        meta = session.get_modelmeta().custom_metadata_map
        if thresholds is None and meta.get(THRESHOLDS_METADATA):
            thresholds = Thresholds.from_json(json.loads(meta[THRESHOLDS_METADATA]), source=f"{path} metadata")
        elif isinstance(thresholds, (str, os.PathLike)):
            thresholds = load_thresholds(thresholds)
        return cls(OnnxBackend(session), int(shape[-1]), thresholds, str(path), _score_rule(meta))

    @classmethod
    def from_openvino(
        cls,
        path: str | os.PathLike,
        *,
        thresholds: Thresholds | Mapping[str, Any] | str | os.PathLike | None = None,
        device: str = "CPU",
        config: dict[str, Any] | None = None,
    ) -> Detector:
        """Load an IR written by :func:`cnc_ad.export.export_openvino` (the ``.xml``; its ``.bin`` lies beside it).

        Args:
            path: the ``.xml`` file.
            thresholds: thresholds, or a thresholds file; default: the thresholds embedded at export
                (``cnc export`` copies the checkpoint's), if any.
            device: OpenVINO device name (default: CPU).
            config: OpenVINO properties for ``compile_model``, e.g. ``{"INFERENCE_NUM_THREADS": 1}``; inference
                runs in float32 unless ``INFERENCE_PRECISION_HINT`` is given here.

        Raises:
            ExportError: openvino is missing, or the files are missing, damaged or not a CNC graph.
        """
        try:
            import openvino as ov
        except ImportError as err:
            raise ExportError(f"running an OpenVINO IR needs openvino ({err}); pip install 'cnc-ad[openvino]'") from err
        from cnc_ad.export import OPENVINO_CONFIG, openvino_bin_path, read_openvino_metadata

        path = Path(path)
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
        if not {"score", "anomaly_map"} <= names or not square or shape is None:
            raise ExportError(f"{path} is not a CNC graph (input (B, 3, S, S); outputs score, anomaly_map)")
        meta = read_openvino_metadata(graph)
        if thresholds is None and meta.get(THRESHOLDS_METADATA):
            thresholds = Thresholds.from_json(json.loads(meta[THRESHOLDS_METADATA]), source=f"{path} metadata")
        elif isinstance(thresholds, (str, os.PathLike)):
            thresholds = load_thresholds(thresholds)
        return cls(OpenVinoBackend(compiled), shape[3].get_length(), thresholds, str(path), _score_rule(meta))

    # ----------------------------------------------------------------------------------------------- thresholds
    def threshold(self, kind: Kind = "image", category: str | None = None) -> float | None:
        """The stored ``kind`` ("image" or "pixel") threshold for ``category`` (None: all categories), or None."""
        return self.thresholds.select(kind, category) if self.thresholds is not None else None

    def resolve_thresholds(
        self, threshold: float | None = None, pixel_threshold: float | None = None, category: str | None = None
    ) -> tuple[float | None, float | None]:
        """The (image, pixel) thresholds a prediction uses.

        Explicit values win; otherwise the stored ones for ``category`` (or all categories). Without any pixel
        threshold the image threshold is used for the mask too: with the default ``max`` score the mask is then
        non-empty exactly when the image is called anomalous.
        """
        image = threshold if threshold is not None else self.threshold("image", category)
        pixel = pixel_threshold if pixel_threshold is not None else self.threshold("pixel", category)
        return image, pixel if pixel is not None else image

    def thresholds_fit_tiling(self, category: str | None = None) -> bool:
        """Whether the stored image threshold (for ``category``) was set the way images are scored now: with
        :attr:`tiling`'s tiles when it is set, on whole images when not. True when there is no stored threshold.
        """
        found = self.thresholds.image.get(ALL if category is None else category) if self.thresholds else None
        if found is None:
            return True
        tiled = TILES_RULE + "=" in found.rule
        return found.rule.endswith(self.tiling.rule_suffix()) if self.tiling is not None else not tiled

    # ---------------------------------------------------------------------------------------------- inference
    def preprocess(self, image: ImageInput) -> tuple[torch.Tensor, tuple[int, int]]:
        """One input -> ``(3, S, S)`` float tensor in [0, 1] and the input's own size ``(H, W)`` in pixels.

        Files are decoded like the datasets do (:class:`cnc_ad.data.ImageFileDataset`); arrays, Pillow images and
        tensors of another size are resized by the same Pillow bilinear resize; ``(3, S, S)`` float tensors pass
        through unchanged.

        Raises:
            DataError: an undecodable file or an unsupported array.
        """
        side = self.image_size
        if isinstance(image, (str, os.PathLike)):
            item = ImageFileDataset([image], side)[0]
            if item.get("error"):
                raise DataError(item["error"])
            height, width = item["size"]
            return item["image"], (int(height), int(width))
        if isinstance(image, torch.Tensor) and (
            image.ndim == 3 and image.shape[0] == 3 and image.shape[1:] == (side, side) and image.is_floating_point()
        ):
            return image.detach().float().cpu(), (side, side)
        pil = _in_memory_to_rgb(image)
        return to_tensor(prepare_image(pil, side)), (pil.height, pil.width)

    def load_full(self, image: ImageInput) -> torch.Tensor:
        """One input at its own resolution as a ``(3, H, W)`` tensor (for tiled scoring): uint8 for files, Pillow
        images and arrays (one byte per value, however large the scan), float in [0, 1] for float tensors.

        Raises:
            DataError: an undecodable file or an unsupported array.
        """
        if isinstance(image, (str, os.PathLike)):
            pil, _ = decode_image(image)
        elif isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == 3 and image.is_floating_point():
            return image.detach().float().cpu()
        else:
            pil = _in_memory_to_rgb(image)
        return torch.from_numpy(np.ascontiguousarray(np.asarray(pil, dtype=np.uint8).transpose(2, 0, 1)))

    @torch.no_grad()
    def score_tiled(self, image: torch.Tensor, batch_size: int = 16) -> tuple[float, np.ndarray]:
        """Score one full-resolution image ``(3, H, W)`` (uint8, or float in [0, 1]) by :attr:`tiling`'s tiles.

        Returns:
            the image score (:attr:`score_rule` on the stitched map) and the stitched map, ``map_size / tile`` of
            the image's resolution (resize it with :func:`cnc_ad.visualize.resize_map`).
        """
        if self.tiling is None:
            raise ValueError("this detector has no tiling; set detector.tiling = Tiling(tile=...)")
        from cnc_ad.tiling import predict_tiled

        score, stitched = predict_tiled(
            lambda tiles: torch.as_tensor(np.asarray(self.backend(tiles)[1])),
            image,
            tile=self.tiling.tile,
            overlap=self.tiling.overlap,
            image_size=self.image_size,
            score=self.score_rule,
            batch_size=max(1, batch_size),
        )
        return score, stitched.numpy()

    @torch.no_grad()
    def score_batch(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Scores (B,) and maps (B, M, M) of preprocessed images (B, 3, S, S) in [0, 1]."""
        return self.backend(images)

    def predict(
        self,
        x: ImageInput | Sequence[ImageInput],
        *,
        batch_size: int = 16,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        category: str | None = None,
    ) -> DetectionResult:
        """Score images and localise anomalies.

        Args:
            x: a path, a PIL image, a NumPy array ((H, W) or (H, W, C); uint8, uint16, or float in [0, 1]), a
                (3, H, W) or (B, 3, H, W) float tensor in [0, 1], or a list of these.
            batch_size: images per model call.
            threshold: image threshold; default: the stored one for ``category``.
            pixel_threshold: mask threshold; default: the stored one, else the image threshold.
            category: use this category's stored thresholds instead of the all-category ones.

        Returns:
            :class:`DetectionResult`, one entry per image, maps at each input's own size.

        Raises:
            DataError: an input cannot be read.
        """
        items = _flatten_inputs(x)
        image_t, pixel_t = self.resolve_thresholds(threshold, pixel_threshold, category)
        scores, maps = [], []
        if self.tiling is not None:
            for item in items:
                full = self.load_full(item)
                score, small_map = self.score_tiled(full, batch_size)
                scores.append(np.array([score], np.float32))
                maps.append(resize_map(small_map, (full.shape[1], full.shape[2])))
            items = []
        for start in range(0, len(items), max(1, batch_size)):
            prepared = [self.preprocess(item) for item in items[start : start + batch_size]]
            batch_scores, batch_maps = self.score_batch(torch.stack([tensor for tensor, _ in prepared]))
            scores.append(batch_scores)
            maps += [resize_map(m, size) for m, (_, size) in zip(batch_maps, prepared, strict=True)]
        scores_all = np.concatenate(scores).astype(np.float32) if scores else np.zeros(0, np.float32)
        masks = [m >= pixel_t for m in maps] if pixel_t is not None else None
        decisions = scores_all >= image_t if image_t is not None else None
        return DetectionResult(scores_all, maps, masks, decisions)
