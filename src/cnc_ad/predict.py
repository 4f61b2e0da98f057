"""Using a trained CNC model on new images: the :class:`Detector` Python API and batch prediction on files.

Every input goes through the data layer's preprocessing (:func:`cnc_ad.data.transforms.prepare_image`, the ADer
protocol: bilinear resize of the whole image to ``S x S``), so training, evaluation and prediction see identical
pixels. The model's ``M x M`` anomaly map is resized (bilinear) back to each input's own size. The same API runs a
checkpoint with PyTorch (:meth:`Detector.from_checkpoint`) or an exported graph with onnxruntime
(:meth:`Detector.from_onnx`, see :mod:`cnc_ad.export`).

Decisions use the F1-max thresholds that evaluation stores beside the checkpoint (:mod:`cnc_ad.results`) or explicit
ones; an image is anomalous when ``score >= threshold``, a pixel when ``map >= pixel threshold``.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from cnc_ad import distributed as dist
from cnc_ad.data.dataset import ImageFileDataset, collate_items
from cnc_ad.data.images import decode_image, is_image_file
from cnc_ad.data.transforms import prepare_image, to_tensor
from cnc_ad.errors import ConfigError, DataError, ExportError
from cnc_ad.files import append_jsonl, atomic_write_bytes, atomic_write_text, read_jsonl
from cnc_ad.results import Thresholds, load_thresholds
from cnc_ad.visualize import overlay, resize_map, to_png_bytes

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.jsonl"
ERRORS_FILE = "errors.jsonl"
SUMMARY_FILE = "predictions.csv"
MAP_DTYPES = ("float16", "float32")
_ARRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "F")
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
    return [x]


# ---------------------------------------------------------------------------------------------------- backends
class TorchBackend:
    """Runs a :class:`cnc_ad.model.CNC` on one device (eval mode, fp32)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
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


# ---------------------------------------------------------------------------------------------------- detector
class Detector:
    """A trained model ready to score images: preprocessing, inference, maps at the input size and decisions.

    Build it with :meth:`from_checkpoint` (PyTorch) or :meth:`from_onnx` (onnxruntime); both behave the same.

    Args:
        backend: scores preprocessed images (B, 3, S, S) in [0, 1] -> (scores (B,), maps (B, M, M)).
        image_size: the model's input side S in pixels.
        thresholds: the stored thresholds (a :class:`~cnc_ad.results.Thresholds`, or a ``thresholds.json``
            mapping), or None.
        source: where the model came from (for messages).
    """

    def __init__(
        self,
        backend: Backend,
        image_size: int,
        thresholds: Thresholds | Mapping[str, Any] | None = None,
        source: str = "",
    ) -> None:
        self.backend = backend
        self.image_size = image_size
        self.thresholds = Thresholds.from_json(thresholds) if isinstance(thresholds, Mapping) else thresholds
        self.source = source

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
        return cls(TorchBackend(model, device), model.image_size, load_thresholds(folder), str(folder))

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
            raise ExportError(f"ONNX file {path} not found; write one with `cnc export --format onnx`")
        try:
            session = ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as err:  # onnxruntime raises its own exception types
            raise ExportError(f"onnxruntime cannot load {path} ({err}); re-export it with `cnc export`") from err
        names = {o.name for o in session.get_outputs()}
        shape = session.get_inputs()[0].shape
        if not {"score", "anomaly_map"} <= names or len(shape) != 4 or not isinstance(shape[-1], int):
            raise ExportError(f"{path} is not a CNC graph (input (B, 3, S, S); outputs score, anomaly_map)")
        meta = session.get_modelmeta().custom_metadata_map
        if thresholds is None and meta.get(THRESHOLDS_METADATA):
            thresholds = Thresholds.from_json(json.loads(meta[THRESHOLDS_METADATA]), source=f"{path} metadata")
        elif isinstance(thresholds, (str, os.PathLike)):
            thresholds = load_thresholds(thresholds)
        return cls(OnnxBackend(session), int(shape[-1]), thresholds, str(path))

    # ----------------------------------------------------------------------------------------------- thresholds
    def threshold(self, kind: str = "image", category: str | None = None) -> float | None:
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
            return item["image"], tuple(int(v) for v in item["size"])
        if isinstance(image, torch.Tensor):
            if (
                image.ndim == 3
                and image.shape[0] == 3
                and image.shape[1:] == (side, side)
                and image.is_floating_point()
            ):
                return image.detach().float().cpu(), (side, side)
            pil = _tensor_to_image(image)
        elif isinstance(image, Image.Image):
            if image.mode in _ARRAY_MODES:  # 16-bit and float images: scaled like arrays of the same dtype
                pil = _array_to_image(np.asarray(image))
            else:
                pil = image if image.mode == "RGB" else image.convert("RGB")
        elif isinstance(image, np.ndarray):
            pil = _array_to_image(image)
        else:
            raise DataError(f"cannot predict on a {type(image).__name__}; pass a path, PIL image, array or tensor")
        return to_tensor(prepare_image(pil, side)), (pil.height, pil.width)

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
        for start in range(0, len(items), max(1, batch_size)):
            prepared = [self.preprocess(item) for item in items[start : start + batch_size]]
            batch_scores, batch_maps = self.score_batch(torch.stack([tensor for tensor, _ in prepared]))
            scores.append(batch_scores)
            maps += [resize_map(m, size) for m, (_, size) in zip(batch_maps, prepared)]
        scores_all = np.concatenate(scores).astype(np.float32) if scores else np.zeros(0, np.float32)
        masks = [m >= pixel_t for m in maps] if pixel_t is not None else None
        decisions = scores_all >= image_t if image_t is not None else None
        return DetectionResult(scores_all, maps, masks, decisions)


# ------------------------------------------------------------------------------------------- batch prediction
def collect_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named by ``inputs``: files, folders (searched recursively) and glob patterns; no duplicates.

    Raises:
        DataError: an input names nothing, or nothing at all was found.
    """
    found: dict[Path, None] = {}
    for entry in inputs:
        text = os.fspath(entry)
        path = Path(text).expanduser()
        if path.is_file():
            matches = [path]
        elif path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
        elif glob.has_magic(text):
            matches = []
            for hit in sorted(glob.glob(os.path.expanduser(text), recursive=True)):
                hit_path = Path(hit)
                if hit_path.is_dir():
                    matches += sorted(p for p in hit_path.rglob("*") if p.is_file() and is_image_file(p))
                elif hit_path.is_file():
                    matches.append(hit_path)
            if not matches:
                raise DataError(f"the pattern {text!r} matches no image file; check it (quote it for the shell)")
        else:
            raise DataError(f"input {text} does not exist; pass image files, folders or glob patterns")
        for match in matches:
            found.setdefault(match.resolve(), None)
    if not found:
        raise DataError("no image files found in the inputs; pass image files, folders or glob patterns")
    return list(found)


def output_name(path: Path) -> str:
    """A stable, collision-free file stem for an input: its stem plus a short hash of its absolute path."""
    digest = hashlib.sha1(os.fsencode(path)).hexdigest()[:10]  # the name's bytes: non-UTF-8 names too
    return f"{path.stem}-{digest}"


@dataclass(frozen=True)
class PredictionSummary:
    """What :func:`predict_files` did: counts of images predicted now, done before (resume), and failed."""

    out: Path
    predicted: int
    skipped: int
    failed: int
    anomalous: int

    @property
    def total(self) -> int:
        return self.predicted + self.skipped + self.failed


def predict_files(
    detector: Detector,
    paths: Sequence[Path],
    out: str | os.PathLike,
    *,
    batch_size: int = 16,
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    category: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    num_workers: int = 0,
    map_dtype: str = "float16",
    overlay_max_side: int = 2048,
    progress: bool = True,
) -> PredictionSummary:
    """Predict image files into a folder, crash-safely.

    Writes, under ``out``: ``maps/<name>.npy`` (the anomaly map at the image's own size, ``map_dtype``),
    ``masks/<name>.png`` (map >= pixel threshold; only with a threshold), ``overlays/<name>.png`` (heatmap over the
    image; its longer side at most ``overlay_max_side``); one ``predictions.jsonl`` line per image
    (``{"path", "score", "is_anomalous", "map", "mask", "overlay"}``, files relative to ``out``), appended and
    fsynced after its files are written; ``errors.jsonl`` (``{"path", "error"}``) for files that cannot be decoded,
    which are skipped; and ``predictions.csv`` (from the JSON lines, written atomically at the end).
    ``<name>`` is the file stem plus a hash of its absolute path, so equal names from different folders never clash.

    Args:
        detector: the model.
        paths: image files (see :func:`collect_inputs`).
        out: output folder.
        batch_size: images per model call.
        threshold: image threshold (default: the stored one for ``category``); without any, ``is_anomalous`` is null.
        pixel_threshold: mask threshold (default: the stored one, else the image threshold); without any, no masks.
        category: use this category's stored thresholds.
        resume: skip images already in ``predictions.jsonl``.
        overwrite: start a new ``predictions.jsonl``/``errors.jsonl`` when ``out`` already holds one.
        num_workers: image decoding processes.
        map_dtype: ``"float16"`` (half the disk) or ``"float32"`` for the ``.npy`` maps; masks use float32 maps.
        overlay_max_side: the longest side of an overlay PNG in pixels.
        progress: show a progress bar.

    Raises:
        ConfigError: ``out`` already holds predictions and neither ``resume`` nor ``overwrite`` is set.
    """
    if map_dtype not in MAP_DTYPES:
        raise ConfigError(f"map dtype {map_dtype!r}; use one of {', '.join(MAP_DTYPES)}")
    out = Path(out)
    paths = [Path(p).resolve() for p in paths]  # records and output names key on absolute paths
    jsonl, errors_file = out / PREDICTIONS_FILE, out / ERRORS_FILE
    done: set[str] = set()
    if jsonl.exists() and jsonl.stat().st_size:
        if resume:
            done = {record["path"] for record in read_jsonl(jsonl) if "path" in record}
        elif not overwrite:
            raise ConfigError(f"{out} already holds predictions; pass --resume to continue them or --overwrite")
        dist.barrier()  # every process has read the old records before any is removed
        if overwrite and dist.is_main_process():
            jsonl.unlink()
            errors_file.unlink(missing_ok=True)
    for folder in ("maps", "masks", "overlays"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    # Under torchrun each process takes its share; all append to the same JSON-lines files (one write per line).
    remaining = [p for p in paths if str(p) not in done]
    skipped = len(paths) - len(remaining)
    todo = dist.shard(remaining)
    if skipped:
        log.info("resuming: %d of %d images already predicted", skipped, len(paths))
    image_t, pixel_t = detector.resolve_thresholds(threshold, pixel_threshold, category)
    if image_t is None:
        log.warning("no threshold (run `cnc eval` or pass --threshold): is_anomalous is null, no masks are written")

    loader = DataLoader(
        ImageFileDataset(todo, detector.image_size),
        batch_size=max(1, batch_size),
        num_workers=num_workers,
        collate_fn=collate_items,
    )
    predicted = failed = anomalous = 0
    bar = tqdm(total=len(todo), desc="predict", unit="img", disable=not progress)
    try:
        for batch in loader:
            for index, reason in batch.pop("errors"):
                message = reason.replace(", or pass --skip-bad", "").replace("; or pass --skip-bad", "")
                log.warning("skipped: %s", message)
                append_jsonl(errors_file, {"path": str(todo[index]), "error": message})
                failed += 1
                bar.update(1)
            if not batch:
                continue
            scores, maps = detector.score_batch(batch["image"])
            for path, size, score, small_map in zip(batch["path"], batch["size"].tolist(), scores, maps):
                try:
                    record = _write_prediction(
                        Path(path),
                        tuple(size),
                        float(score),
                        small_map,
                        out,
                        image_t,
                        pixel_t,
                        map_dtype,
                        overlay_max_side,
                    )
                except DataError as err:  # the file changed or vanished since it was decoded
                    log.warning("skipped: %s", err)
                    append_jsonl(errors_file, {"path": path, "error": str(err)})
                    failed += 1
                    bar.update(1)
                    continue
                append_jsonl(jsonl, record)
                predicted += 1
                anomalous += bool(record["is_anomalous"])
                bar.update(1)
    finally:
        bar.close()
        if not dist.is_distributed() and jsonl.exists():  # also after an interruption
            write_summary_csv(jsonl, out / SUMMARY_FILE)
    if dist.is_distributed():
        counts = np.sum(dist.all_gather_objects((predicted, failed, anomalous)), axis=0).tolist()
        predicted, failed, anomalous = (int(c) for c in counts)
        if dist.is_main_process() and jsonl.exists():
            write_summary_csv(jsonl, out / SUMMARY_FILE)
    return PredictionSummary(out, predicted, skipped, failed, anomalous)


def _write_prediction(
    path: Path,
    size: tuple[int, int],
    score: float,
    small_map: np.ndarray,
    out: Path,
    image_threshold: float | None,
    pixel_threshold: float | None,
    map_dtype: str,
    overlay_max_side: int,
) -> dict[str, Any]:
    """Write one image's map, mask and overlay; return its ``predictions.jsonl`` record."""
    name = output_name(path)
    full = resize_map(small_map, size)  # (H, W) float32
    buffer = io.BytesIO()
    np.save(buffer, full.astype(map_dtype))
    map_rel = f"maps/{name}.npy"
    atomic_write_bytes(out / map_rel, buffer.getvalue())
    mask_rel = None
    if pixel_threshold is not None:
        mask_rel = f"masks/{name}.png"
        atomic_write_bytes(out / mask_rel, to_png_bytes(full >= pixel_threshold))
    overlay_rel = f"overlays/{name}.png"
    atomic_write_bytes(
        out / overlay_rel, to_png_bytes(_overlay(path, size, small_map, pixel_threshold, overlay_max_side))
    )
    return {
        "path": str(path),
        "score": score,
        "is_anomalous": None if image_threshold is None else score >= image_threshold,
        "map": map_rel,
        "mask": mask_rel,
        "overlay": overlay_rel,
    }


def _overlay(
    path: Path, size: tuple[int, int], small_map: np.ndarray, pixel_threshold: float | None, max_side: int
) -> np.ndarray:
    """The heatmap over the image, at most ``max_side`` pixels on its longer side.

    The colour scale is fixed at [0, 2 x pixel threshold] when a threshold is known (the threshold is the middle
    colour, so overlays compare across images), else the map's own range.
    """
    height, width = size
    scale = min(1.0, max_side / max(height, width))
    target = (max(1, round(height * scale)), max(1, round(width * scale)))
    image, _ = decode_image(path, max(target))  # JPEGs decode at a reduced scale: memory-safe for huge files
    if image.size != (target[1], target[0]):
        image = image.resize((target[1], target[0]), Image.Resampling.BILINEAR, reducing_gap=3.0)
    vmax = 2.0 * pixel_threshold if pixel_threshold is not None and pixel_threshold > 0 else None
    return overlay(np.asarray(image, np.uint8), small_map, vmin=0.0 if vmax else None, vmax=vmax)


def write_summary_csv(jsonl: str | os.PathLike, csv_path: str | os.PathLike) -> Path:
    """Write ``predictions.csv`` atomically from ``predictions.jsonl`` (one row per path, the last record wins)."""
    records = {record["path"]: record for record in read_jsonl(jsonl) if "path" in record}
    buffer = io.StringIO()
    fields = ["path", "score", "is_anomalous", "map", "mask", "overlay"]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for record in records.values():
        writer.writerow({k: "" if record.get(k) is None else record.get(k) for k in fields})
    atomic_write_text(csv_path, buffer.getvalue())
    return Path(csv_path)
