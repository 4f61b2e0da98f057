"""A request's images through the detector: decoded in worker threads, scored through the batcher, recorded in the
decision log, rendered as JSON.

The server adds only its own concerns to :class:`cnc_ad.deploy.Detector`'s path: it bounds how many full-size
decoded images are held at once, hands the model calls to the :class:`~cnc_ad.deploy.serve.batcher.Batcher` (one
model call for many concurrent images; tiles of a tiled image are batched the same way), maps failures to HTTP errors,
records each decision (:class:`~cnc_ad.deploy.decisions.DecisionLog`, before the answer leaves) and renders each
:class:`~cnc_ad.deploy.detector.ImageResult` (:mod:`cnc_ad.deploy.serve.render`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from starlette.concurrency import run_in_threadpool

from cnc_ad.deploy import inputs
from cnc_ad.deploy.decisions import DecisionLog
from cnc_ad.deploy.detector import Detector, ImageResult, ThresholdChoice
from cnc_ad.deploy.inputs import Upload
from cnc_ad.deploy.serve.batcher import Batcher, BatcherBusy, BatcherClosed, ModelFailure
from cnc_ad.deploy.serve.errors import APIError
from cnc_ad.deploy.serve.guard import Load, busy
from cnc_ad.deploy.serve.render import json_float, output_size, render_result
from cnc_ad.deploy.serve.settings import ServeSettings
from cnc_ad.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class _Decoded:
    array: np.ndarray  # the model input (3, S, S), or the full image (H, W, 3) uint8 for tiles
    name: str
    size: tuple[int, int]  # the image's own (H, W)
    shown: Image.Image | None  # the image at the returned size, kept when an overlay is asked for or may be logged
    encoded: bytes | None  # the upload's bytes, kept for the decision log (its digest; the kept image)


@contextmanager
def _http_errors(timeout_s: float) -> Iterator[None]:
    """Batcher failures as 503 errors (overload, shutdown, a model error, no result in time); a model error's text
    stays in the server log, under the id that the message names.
    """
    try:
        yield
    except BatcherBusy as err:
        raise busy(f"the server is overloaded ({err})") from None
    except BatcherClosed as err:
        raise APIError(503, "unavailable", f"the model worker is not running ({err})") from None
    except ModelFailure as err:
        raise APIError(
            503, "model_error", f"the model failed on this request's batch; see the server log (id {err.failure_id})"
        ) from None
    except (asyncio.TimeoutError, FutureTimeout):
        raise APIError(
            503, "timeout", f"the request took longer than the server's limit of {timeout_s:g} s; retry later"
        ) from None


class RequestScorer:
    """Scores the images of requests with ``detector`` through ``batcher``, under ``settings``' limits.

    Args:
        detector: the model and its thresholds.
        batcher: gathers the model inputs of concurrent requests into model calls.
        settings: the limits on pixels, images and time.
        load: the images being decoded or waiting for the model, shared with the
            :class:`~cnc_ad.deploy.serve.guard.RequestGuard` (which refuses a POST while it is full).
        decisions: the decision log every decision is recorded in, or None.
    """

    def __init__(
        self,
        detector: Detector,
        batcher: Batcher,
        settings: ServeSettings,
        load: Load,
        decisions: DecisionLog | None = None,
    ) -> None:
        self.detector = detector
        self.batcher = batcher
        self.settings = settings
        self.load = load
        self.decisions = decisions
        self.decode_slots = asyncio.Semaphore(max(2, os.cpu_count() or 1))  # full-size decoded images held at once

    def decode(self, upload: Upload, keep_picture: bool, keep_bytes: bool = False) -> _Decoded:
        """One upload -> model input (or full image, for tiles) and picture; 4xx :class:`APIError` when unreadable."""
        if not upload.data:
            raise APIError(400, "empty_file", f"image {upload.name} is empty (0 bytes); send the file's content")
        limit = self.settings.max_pixels
        try:
            if self.detector.tiling is None:
                array, picture = inputs.prepare(upload, self.detector.image_size, max_pixels=limit)
            else:
                array, picture = inputs.full_resolution(upload, max_pixels=limit)
        except inputs.TooManyPixels as err:
            raise APIError(413, "too_many_pixels", str(err)) from None
        except DataError as err:
            raise APIError(400, "undecodable_image", str(err)) from None
        shown = None
        if keep_picture:  # the overlay is drawn at the returned size, not at full size
            height, width = output_size(picture.size, self.settings.output_max_side)
            shown = picture.image.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return _Decoded(array, picture.name, picture.size, shown, upload.data if keep_bytes else None)

    def check_pixels(self, images: list[tuple[str, bytes]]) -> None:
        """Refuse a request whose images declare (in their headers) too many pixels, each or together: 413."""
        total = 0
        try:
            for name, data in images:
                total += inputs.check_pixels(Upload(data, name), self.settings.max_pixels) or 0
        except inputs.TooManyPixels as err:
            raise APIError(413, "too_many_pixels", str(err)) from None
        if total > self.settings.max_request_pixels:
            raise APIError(
                413,
                "too_many_pixels",
                f"the {len(images)} images of this request have {total} pixels together, more than the limit of "
                f"{self.settings.max_request_pixels} per request; send fewer images per request",
            )

    async def score(
        self,
        images: list[tuple[str, bytes]],
        thresholds: ThresholdChoice,
        outputs: frozenset[str],
        deadline: float,
        *,
        category: str | None = None,
        record: bool = True,
    ) -> list[dict[str, Any]]:
        """The JSON result of every image of a request (``images``: ``(name, bytes)``, emptied as they are decoded).

        Args:
            images: the uploads ``(name, encoded bytes)``.
            thresholds: the thresholds to decide by (:meth:`~cnc_ad.deploy.Detector.choose_thresholds`).
            outputs: which PNGs to return (``map``, ``mask``, ``overlay``).
            deadline: when the request's time is up, on :func:`time.monotonic`'s clock.
            category: the category asked for (recorded with each decision).
            record: record the decisions in the decision log, when there is one (the self-test does not).
        """
        await run_in_threadpool(self.check_pixels, images)
        if not self.load.reserve(len(images)):
            raise busy(f"the server is decoding its limit of {self.load.max_images} images")
        try:
            return await self._score(images, thresholds, outputs, deadline, category, record)
        finally:
            self.load.release(len(images))

    async def _score(
        self,
        images: list[tuple[str, bytes]],
        thresholds: ThresholdChoice,
        outputs: frozenset[str],
        deadline: float,
        category: str | None,
        record: bool,
    ) -> list[dict[str, Any]]:
        decisions = self.decisions if record else None
        keep_picture = "overlay" in outputs or (decisions is not None and decisions.keep != "none")
        decoded = []
        for index in range(len(images)):
            name, data = images[index]
            images[index] = (name, b"")  # the encoded bytes are not needed any more (but by the decision log)
            async with self.decode_slots:  # bounds the full-size decoded images held at once
                item = await run_in_threadpool(self.decode, Upload(data, name), keep_picture, decisions is not None)
                decoded.append(item)
            del data
        with _http_errors(self.settings.request_timeout_s):
            if self.detector.tiling is None:
                scored = await self._batched([item.array for item in decoded], deadline - time.monotonic())
            else:
                scored = [await run_in_threadpool(self._tiled, item.array, deadline) for item in decoded]
        bodies = []
        for item, (score, small_map) in zip(decoded, scored, strict=True):
            result = Detector.decide(score, small_map, item.size, thresholds.image, thresholds.pixel)
            body = await run_in_threadpool(
                render_result, result, item.shown, outputs=outputs, max_side=self.settings.output_max_side
            )
            decision_id = None
            if decisions is not None:
                decision_id = await run_in_threadpool(self._record, decisions, result, thresholds, item, category)
            bodies.append(
                {
                    "name": item.name,
                    **body,
                    "threshold": json_float(thresholds.image),
                    "threshold_source": thresholds.source,
                    "threshold_rule": thresholds.rule,
                    "threshold_images": thresholds.images,
                    "id": decision_id,
                }
            )
        return bodies

    @staticmethod
    def _record(
        decisions: DecisionLog, result: ImageResult, thresholds: ThresholdChoice, item: _Decoded, category: str | None
    ) -> str:
        """Record one decision (in a worker thread); its id. A record that cannot be written is a 503: a decision
        that is not on record is not given.
        """
        shown = item.shown
        overlay = None if shown is None else (lambda: result.overlay(np.asarray(shown, np.uint8)))
        assert item.encoded is not None, "kept while a decision log is open"
        try:
            decision = decisions.record(
                result, thresholds, name=item.name, image=item.encoded, category=category, overlay=overlay
            )
        except OSError as err:
            error_id = secrets.token_hex(4)
            log.error("the decision log could not record %s (id %s): %s", item.name, error_id, err)
            raise APIError(
                503, "decision_log_failed", f"the decision could not be recorded; see the server log (id {error_id})"
            ) from None
        return decision.id

    async def self_test(self, deadline: float) -> float:
        """Score one small synthetic image through the path of every request (decoding, batcher, rendering).

        Returns:
            Its anomaly score.

        Raises:
            APIError: the model failed on it or took too long.
            ValueError: the score is not a finite number.
        """
        ramp = np.linspace(0, 255, 64, dtype=np.uint8)
        picture = np.stack([np.tile(ramp, (48, 1)), np.tile(ramp[:48, None], (1, 64)), np.full((48, 64), 128)], -1)
        buffer = io.BytesIO()
        Image.fromarray(picture.astype(np.uint8)).save(buffer, format="PNG")
        nothing = ThresholdChoice(None, None)
        body = (await self.score([("self-test", buffer.getvalue())], nothing, frozenset(), deadline, record=False))[0]
        if body["score"] is None:
            raise ValueError("the model scored the self-test image as NaN or infinite")
        return float(body["score"])

    async def _batched(self, arrays: list[np.ndarray], timeout_s: float) -> list[tuple[float, np.ndarray]]:
        """Submit every model input to the batcher and wait for all of them."""
        futures: list[Future] = []
        try:
            for array in arrays:
                futures.append(self.batcher.submit(array))
            return await asyncio.wait_for(asyncio.gather(*(asyncio.wrap_future(f) for f in futures)), timeout_s)
        finally:
            for future in futures:
                future.cancel()  # no effect on finished ones; frees the queue of a failed request's other images

    def _tiled(self, image: np.ndarray, deadline: float) -> tuple[float, np.ndarray]:
        """Score one full image by tiles (in a worker thread), each batch of tiles through the batcher."""

        def maps(tiles: np.ndarray) -> np.ndarray:
            futures = [self.batcher.submit(tile) for tile in tiles]
            try:
                return np.stack([f.result(timeout=max(0.0, deadline - time.monotonic()))[1] for f in futures])
            finally:
                for future in futures:
                    future.cancel()

        return self.detector.score_tiled(image, map_function=maps, batch_size=self.settings.max_batch_size)
