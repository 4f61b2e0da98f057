"""Using a trained CNC model on new images: :class:`Detector`, the one path from an image to a decision.

``Detector.load(source)`` opens a run folder or checkpoint (PyTorch), an ``.onnx`` graph (ONNX Runtime) or an OpenVINO
``.xml`` IR (:mod:`cnc_ad.deploy.backends`), with the thresholds stored for it. :meth:`Detector.results` turns inputs
(paths, bytes, arrays, Pillow images, tensors) into one :class:`Outcome` each: decoded and prepared by
:mod:`cnc_ad.deploy.inputs` (in threads, ahead of the model), scored in batches (or by tiles,
:mod:`cnc_ad.deploy.tiling`), and decided by :meth:`Detector.decide`, the one place where scores become results.
``cnc predict``, ``--watch``, ``cnc calibrate`` and ``cnc serve`` are consumers of it; the server hands
:meth:`Detector.score` to its micro-batcher. Nothing here imports torch unless the source is a checkpoint.

Decisions: an image is anomalous when ``score >= threshold``, a pixel when ``map >= pixel threshold``; thresholds
come from the stored file (:mod:`cnc_ad.thresholds`) or the caller (:meth:`Detector.choose_thresholds` says which, and
how the value was found). :meth:`Detector.reload_thresholds` re-reads the file they came from (a server picks up new
thresholds without a restart); :attr:`Detector.model_id` names the model a decision was made by.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cnc_ad.deploy import inputs
from cnc_ad.deploy.backends import Backend, Opened, open_backend
from cnc_ad.deploy.inputs import ImageInput, Picture
from cnc_ad.deploy.tiling import TILES_RULE, MapFunction, Tiling, score_tiled
from cnc_ad.errors import ConfigError, DataError
from cnc_ad.thresholds import ALL, Kind, Thresholds, load_thresholds
from cnc_ad.visualize import overlay, resize_map

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class ImageResult:
    """The decision on one image.

    Attributes:
        score: the image anomaly score.
        small_map: the model's anomaly map (M, M), or the stitched map of a tiled image (smaller than the image).
        size: the image's own size ``(H, W)`` in pixels.
        threshold: the image threshold it was decided by, or None (no decision).
        pixel_threshold: the mask threshold, or None (no mask).
    """

    score: float
    small_map: np.ndarray
    size: tuple[int, int]
    threshold: float | None
    pixel_threshold: float | None

    @property
    def is_anomalous(self) -> bool | None:
        return None if self.threshold is None else bool(self.score >= self.threshold)

    def anomaly_map(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """The map at ``size`` (default: the image's own), float32, bilinear from :attr:`small_map`."""
        return resize_map(self.small_map, size or self.size)

    def mask(self, size: tuple[int, int] | None = None, anomaly_map: np.ndarray | None = None) -> np.ndarray | None:
        """``map >= pixel threshold`` at ``size`` (or of a map already resized), bool; None without a threshold."""
        if self.pixel_threshold is None:
            return None
        anomaly_map = anomaly_map if anomaly_map is not None else self.anomaly_map(size)
        # Compared in float64: a threshold beyond float32's range (a request's 1e300) is no overflow, and decides.
        return np.greater_equal(anomaly_map, self.pixel_threshold, signature=(np.float64, np.float64, np.bool_))

    def overlay(self, image: np.ndarray) -> np.ndarray:
        """The heatmap over ``image`` ``(H', W', 3)`` uint8 at that size, on a colour scale from 0 to twice the pixel
        threshold when one is known (the threshold is the middle colour, so overlays compare across images), else the
        map's own range.
        """
        pixel = self.pixel_threshold
        vmax = 2.0 * pixel if pixel is not None and pixel > 0 else None
        return overlay(np.asarray(image, np.uint8), self.small_map, vmin=0.0 if vmax else None, vmax=vmax)


@dataclass(frozen=True)
class ThresholdChoice:
    """The thresholds a decision is made by, where the image threshold came from and how it was found.

    Attributes:
        image: the image threshold, or None (no decision).
        pixel: the mask threshold (the image threshold when none is known), or None.
        source: ``"request"`` (given by the caller), ``"category"`` (stored for the category asked for), ``"__all__"``
            (the stored shared one, no category asked for), or None (no image threshold).
        rule: how the image threshold was found: the stored rule (:class:`~cnc_ad.thresholds.Threshold`, ``""`` when
            the file does not say), ``"request"`` for a given one, or None.
        images: the images behind the stored image threshold, or None.
        digest: :meth:`~cnc_ad.thresholds.Thresholds.digest` of the stored thresholds in use, or None without any.
    """

    image: float | None
    pixel: float | None
    source: str | None = None
    rule: str | None = None
    images: int | None = None
    digest: str | None = None


@dataclass(frozen=True)
class Outcome:
    """One input's outcome in :meth:`Detector.results`: its result, or why it could not be read.

    Attributes:
        index: the input's position.
        item: the input as given.
        name: what records call it (its path, an upload's name, ``"array"``...).
        result: the decision, or None when the input could not be read.
        error: why it could not be read (a one-line message), or None.
        picture: the decoded image, kept when asked (``keep_pictures``), for overlays.
    """

    index: int
    item: ImageInput
    name: str
    result: ImageResult | None
    error: str | None = None
    picture: Picture | None = None


class Detector:
    """A trained model ready to score images: preprocessing, inference, maps at the input size and decisions.

    Build one with :meth:`load`, or around a backend of your own.

    Args:
        backend: the engine (:mod:`cnc_ad.deploy.backends`).
        thresholds: the thresholds it decides by (a :class:`~cnc_ad.thresholds.Thresholds`, or a ``thresholds.json``
            mapping), or None.
        source: where the model came from (for messages).
        thresholds_file: where thresholds set for this model are stored (``cnc calibrate``), or None.
        tiling: score every image by tiles (:class:`~cnc_ad.deploy.tiling.Tiling`) instead of resizing it whole.
        model_id: the model's identity (a digest of its weights and metadata), or None when unknown.
        thresholds_source: the file :meth:`reload_thresholds` re-reads the thresholds from, or None (they were given
            in memory).
    """

    def __init__(
        self,
        backend: Backend,
        thresholds: Thresholds | Mapping[str, Any] | None = None,
        *,
        source: str = "",
        thresholds_file: str | os.PathLike | None = None,
        tiling: Tiling | None = None,
        model_id: str | None = None,
        thresholds_source: str | os.PathLike | None = None,
    ) -> None:
        self.backend = backend
        self.thresholds = Thresholds.from_json(thresholds) if isinstance(thresholds, Mapping) else thresholds
        self.source = source
        self.thresholds_file = Path(thresholds_file) if thresholds_file is not None else None
        self.tiling = tiling
        self.model_id = model_id
        self.thresholds_source = Path(thresholds_source) if thresholds_source is not None else None

    @classmethod
    def load(
        cls,
        source: str | os.PathLike,
        *,
        thresholds: Thresholds | Mapping[str, Any] | str | os.PathLike | None = None,
        tiling: Tiling | None = None,
        device: str = "auto",
        clip_weights: str | None = None,
        trust_pickle: bool = False,
        pretrained: bool = True,
        providers: Sequence[str] | None = None,
        openvino_config: Mapping[str, Any] | None = None,
        threads: int | None = None,
    ) -> Detector:
        """Open a model with the thresholds stored for it.

        Args:
            source: a run folder, a checkpoint folder or ``RUN/last`` (PyTorch); a ``.onnx`` graph (ONNX Runtime); an
                OpenVINO ``.xml`` (its ``.bin`` beside it). Exported graphs need no torch.
            thresholds: thresholds, or a thresholds file, to decide by instead of the stored ones (a checkpoint's
                ``thresholds.json``; for an exported graph, the file beside it, else the ones embedded at export).
            tiling: score every image by tiles.
            device: checkpoints: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:N"``; OpenVINO: its device
                (``"auto"``: CPU).
            clip_weights: checkpoints: a local CLIP weights file (offline use).
            trust_pickle: checkpoints: allow a pickle / TorchScript ``clip_weights`` file.
            pretrained: checkpoints: False builds the random (seeded) backbone instead of loading weights (tests).
            providers: ONNX Runtime execution providers (default: CPU).
            openvino_config: OpenVINO properties, e.g. ``{"PERFORMANCE_HINT": "THROUGHPUT"}`` (float32 unless
                ``INFERENCE_PRECISION_HINT`` is given).
            threads: exported models: CPU threads per inference (default: the engine's choice, all cores).

        Raises:
            MissingExtra: the engine for this source is not installed (the message names the extra).
            ExportError, CheckpointError: the source is missing, damaged or not a CNC model.
        """
        opened: Opened = open_backend(
            source,
            device=device,
            clip_weights=clip_weights,
            trust_pickle=trust_pickle,
            pretrained=pretrained,
            providers=providers,
            openvino_config=openvino_config,
            threads=threads,
        )
        reread: str | os.PathLike | None = opened.thresholds_file  # where the stored thresholds are re-read from
        if isinstance(thresholds, (str, os.PathLike)):
            reread, thresholds = thresholds, load_thresholds(thresholds)
        elif thresholds is not None:
            reread = None
        return cls(
            opened.backend,
            thresholds if thresholds is not None else opened.thresholds,
            source=opened.source,
            thresholds_file=opened.thresholds_file,
            tiling=tiling,
            model_id=opened.model_id,
            thresholds_source=reread,
        )

    # --------------------------------------------------------------------------------------------- the model
    @property
    def image_size(self) -> int:
        """The model's input side S in pixels."""
        return self.backend.image_size

    @property
    def score_rule(self) -> str:
        """How the model turns a map into an image score (``model.score``); tiled scoring applies it too."""
        return self.backend.score_rule

    @property
    def backend_name(self) -> str:
        """``"torch"``, ``"onnxruntime"`` or ``"openvino"``."""
        return self.backend.name

    @property
    def config(self) -> dict[str, Any]:
        """The model config (preset, map size, score rule...), as stored in the checkpoint or exported graph."""
        return self.backend.config

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores (B,) and maps (B, M, M) of prepared images (B, 3, S, S) float32 in [0, 1]."""
        return self.backend(images)

    def score_tiled(
        self, image: np.ndarray, *, map_function: MapFunction | None = None, batch_size: int = 16
    ) -> tuple[float, np.ndarray]:
        """Score one full-resolution image ``(H, W, 3)`` uint8 by :attr:`tiling`'s tiles.

        Args:
            image: the image (:func:`cnc_ad.deploy.inputs.full_resolution`).
            map_function: scores prepared tiles -> maps; default: the backend (the server passes its batcher).
            batch_size: tiles per call.

        Returns:
            the image score (:attr:`score_rule` on the stitched map) and the stitched map, ``map_size / tile`` of
            the image's resolution.
        """
        if self.tiling is None:
            raise ValueError("this detector has no tiling; set detector.tiling = Tiling(tile=...)")
        function = map_function or (lambda tiles: self.score(tiles)[1])
        return score_tiled(
            function,
            image,
            self.tiling,
            image_size=self.image_size,
            score_rule=self.score_rule,
            batch_size=max(1, batch_size),
        )

    # ---------------------------------------------------------------------------------------------- thresholds
    def threshold(self, kind: Kind = "image", category: str | None = None) -> float | None:
        """The stored ``kind`` ("image" or "pixel") threshold for ``category`` (None: all categories), or None."""
        return self.thresholds.select(kind, category) if self.thresholds is not None else None

    def resolve_thresholds(
        self, threshold: float | None = None, pixel_threshold: float | None = None, category: str | None = None
    ) -> tuple[float | None, float | None]:
        """The (image, pixel) thresholds a prediction uses (:meth:`choose_thresholds`).

        Raises:
            ConfigError: ``category`` has no stored thresholds.
        """
        choice = self.choose_thresholds(threshold, pixel_threshold, category)
        return choice.image, choice.pixel

    def choose_thresholds(
        self, threshold: float | None = None, pixel_threshold: float | None = None, category: str | None = None
    ) -> ThresholdChoice:
        """The thresholds a prediction uses, where they came from and how they were found.

        Explicit values win; otherwise the stored ones for ``category`` (or all categories; a category without a finite
        threshold of its own has none). Without any pixel threshold the image threshold is used for the mask too: with
        the default ``max`` score the mask is then non-empty exactly when the image is called anomalous. The stored
        thresholds are read once, so a concurrent :meth:`reload_thresholds` never mixes two files in one choice.

        Raises:
            ConfigError: ``category`` has no stored thresholds.
        """
        stored = self.thresholds  # one snapshot
        image, pixel = threshold, pixel_threshold
        if stored is not None:
            image = image if image is not None else stored.select("image", category)
            pixel = pixel if pixel is not None else stored.select("pixel", category)
        pixel = pixel if pixel is not None else image
        digest = stored.digest() if stored is not None else None
        if threshold is not None:
            return ThresholdChoice(image, pixel, "request", "request", None, digest)
        if image is None or stored is None:
            return ThresholdChoice(None, pixel, None, None, None, digest)
        found = stored.image[ALL if category is None else category]
        return ThresholdChoice(image, pixel, ALL if category is None else "category", found.rule, found.images, digest)

    def reload_thresholds(self) -> bool:
        """Re-read the thresholds from :attr:`thresholds_source` (the file they were loaded from, or where the stored
        ones live); return whether they changed. Decisions already under way finish with the ones they began with.

        A file that does not exist (yet) leaves the thresholds as they are: an exported model keeps the ones embedded
        at export until thresholds are stored beside it.

        Raises:
            ConfigError: the thresholds were given in memory, so there is no file to re-read.
            DataError: the file is unreadable or not a thresholds file (the thresholds stay as they were).
        """
        path = self.thresholds_source
        if path is None:
            raise ConfigError("this detector was given its thresholds in memory, not from a file: none to reload")
        if not path.is_file():
            log.info("no thresholds file at %s: the thresholds stay as they are", path)
            return False
        new = load_thresholds(path)
        assert new is not None, "a file, not a folder"
        old = self.thresholds
        self.thresholds = new
        changed = old is None or old.digest() != new.digest()
        log.info("thresholds %s from %s (%s)", "reloaded" if changed else "unchanged", path, new.digest())
        return changed

    def thresholds_fit_tiling(self, category: str | None = None) -> bool:
        """Whether the stored image threshold (for ``category``) was set the way images are scored now: with
        :attr:`tiling`'s tiles when it is set, on whole images when not. True when there is no stored threshold.
        """
        found = self.thresholds.image.get(ALL if category is None else category) if self.thresholds else None
        if found is None:
            return True
        tiled = TILES_RULE + "=" in found.rule
        return found.rule.endswith(self.tiling.rule_suffix()) if self.tiling is not None else not tiled

    @staticmethod
    def decide(
        score: float,
        small_map: np.ndarray,
        size: tuple[int, int],
        threshold: float | None,
        pixel_threshold: float | None,
    ) -> ImageResult:
        """The one place where a score and a map become a result (every consumer calls it)."""
        return ImageResult(float(score), np.asarray(small_map, np.float32), size, threshold, pixel_threshold)

    # ------------------------------------------------------------------------------------------------ scoring
    def results(
        self,
        items: Iterable[ImageInput],
        *,
        batch_size: int = 16,
        workers: int = 2,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        category: str | None = None,
        max_pixels: int | None = None,
        keep_pictures: bool = False,
    ) -> Iterator[Outcome]:
        """Score inputs, yielding one :class:`Outcome` per input, in order, as batches finish.

        Inputs are decoded and prepared in ``workers`` threads ahead of the model (Pillow decodes without the GIL).
        An input that cannot be read gives an outcome with its ``error``; the others go on.

        Args:
            items: paths, bytes (or :class:`~cnc_ad.deploy.inputs.Upload`), arrays, Pillow images or tensors.
            batch_size: images (with tiling: tiles) per model call.
            workers: decoding threads (0: decode in this thread).
            threshold: image threshold; default: the stored one for ``category``.
            pixel_threshold: mask threshold; default: the stored one, else the image threshold.
            category: decide with this category's stored thresholds.
            max_pixels: refuse encoded images that declare more pixels (an outcome with an error).
            keep_pictures: keep each decoded image in its outcome (for overlays).
        """
        image_t, pixel_t = self.resolve_thresholds(threshold, pixel_threshold, category)
        batch_size = max(1, batch_size)
        if self.tiling is not None:
            load = lambda item: inputs.full_resolution(item, max_pixels=max_pixels)  # noqa: E731
        else:
            load = lambda item: inputs.prepare(item, self.image_size, max_pixels=max_pixels)  # noqa: E731
        pending: list[tuple[int, ImageInput, np.ndarray, Picture]] = []
        for index, item, loaded in _ahead(load, items, workers, lookahead=2 * batch_size):
            if isinstance(loaded, DataError):
                yield from self._flush(pending, image_t, pixel_t, keep_pictures)
                pending = []
                yield Outcome(index, item, inputs.describe(item), None, str(loaded))
                continue
            array, picture = loaded
            if self.tiling is not None:
                score, stitched = self.score_tiled(array, batch_size=batch_size)
                result = self.decide(score, stitched, picture.size, image_t, pixel_t)
                yield Outcome(index, item, picture.name, result, None, picture if keep_pictures else None)
                continue
            pending.append((index, item, array, picture))
            if len(pending) == batch_size:
                yield from self._flush(pending, image_t, pixel_t, keep_pictures)
                pending = []
        yield from self._flush(pending, image_t, pixel_t, keep_pictures)

    def _flush(
        self,
        pending: list[tuple[int, ImageInput, np.ndarray, Picture]],
        image_t: float | None,
        pixel_t: float | None,
        keep_pictures: bool,
    ) -> Iterator[Outcome]:
        if not pending:
            return
        scores, maps = self.score(np.stack([array for _, _, array, _ in pending]))
        for (index, item, _, picture), score, small_map in zip(pending, scores, maps, strict=True):
            result = self.decide(score, small_map, picture.size, image_t, pixel_t)
            yield Outcome(index, item, picture.name, result, None, picture if keep_pictures else None)

    def predict(
        self,
        x: ImageInput | Sequence[ImageInput],
        *,
        batch_size: int = 16,
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        category: str | None = None,
    ) -> DetectionResult:
        """Score images and localise anomalies, in memory.

        Args:
            x: a path, encoded bytes, a PIL image, a NumPy array ((H, W) or (H, W, C); uint8, uint16, or float in
                [0, 1]), a (3, H, W) or (B, 3, H, W) float tensor in [0, 1], or a list of these.
            batch_size: images per model call.
            threshold: image threshold; default: the stored one for ``category``.
            pixel_threshold: mask threshold; default: the stored one, else the image threshold.
            category: use this category's stored thresholds instead of the all-category ones.

        Returns:
            :class:`DetectionResult`, one entry per image, maps at each input's own size.

        Raises:
            DataError: an input cannot be read.
        """
        found: list[ImageResult] = []
        for outcome in self.results(
            inputs.flatten_inputs(x),
            batch_size=batch_size,
            workers=0,
            threshold=threshold,
            pixel_threshold=pixel_threshold,
            category=category,
        ):
            if outcome.result is None:
                raise DataError(outcome.error or f"cannot read {outcome.name}")
            found.append(outcome.result)
        scores = np.array([r.score for r in found], np.float32)
        maps = [r.anomaly_map() for r in found]
        masks = [r.mask(anomaly_map=m) for r, m in zip(found, maps, strict=True)]
        decisions = [r.is_anomalous for r in found]
        return DetectionResult(
            scores,
            maps,
            None if any(m is None for m in masks) else masks,  # type: ignore[arg-type]  # checked: no None
            None if any(d is None for d in decisions) else np.array(decisions, bool),
        )


def _ahead(
    load: Any, items: Iterable[ImageInput], workers: int, lookahead: int
) -> Iterator[tuple[int, ImageInput, Any]]:
    """``(index, item, load(item))`` in order, ``load`` running in ``workers`` threads up to ``lookahead`` items ahead;
    a :class:`DataError` from ``load`` is yielded in place of its value.
    """

    def attempt(item: ImageInput) -> Any:
        try:
            return load(item)
        except DataError as err:
            return err

    if workers <= 0:
        for index, item in enumerate(items):
            yield index, item, attempt(item)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cnc-decode") as pool:
        queued: deque[tuple[int, ImageInput, Future]] = deque()
        try:
            for index, item in enumerate(items):
                queued.append((index, item, pool.submit(attempt, item)))
                if len(queued) > lookahead:
                    first, given, future = queued.popleft()
                    yield first, given, future.result()
            while queued:
                first, given, future = queued.popleft()
                yield first, given, future.result()
        finally:
            for _, _, future in queued:
                future.cancel()
