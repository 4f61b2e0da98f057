"""A request's images through the detector: decoded in worker threads, scored through the batcher, rendered as JSON.

The server adds only its own concerns to :class:`cnc_ad.deploy.Detector`'s path: it bounds how many full-size
decoded images are held at once, hands the model calls to the :class:`~cnc_ad.deploy.serve.batcher.Batcher` (one
model call for many concurrent images; tiles of a tiled image are batched the same way), maps failures to HTTP errors,
and renders each :class:`~cnc_ad.deploy.detector.ImageResult` (:mod:`cnc_ad.deploy.serve.render`).
"""

from __future__ import annotations

import asyncio
import io
import os
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
from cnc_ad.deploy.detector import Detector
from cnc_ad.deploy.inputs import Upload
from cnc_ad.deploy.serve.batcher import Batcher, BatcherBusy, BatcherClosed, ModelFailure
from cnc_ad.deploy.serve.errors import APIError
from cnc_ad.deploy.serve.guard import Load, busy
from cnc_ad.deploy.serve.render import output_size, render_result
from cnc_ad.deploy.serve.settings import ServeSettings
from cnc_ad.errors import DataError


@dataclass
class _Decoded:
    array: np.ndarray  # the model input (3, S, S), or the full image (H, W, 3) uint8 for tiles
    name: str
    size: tuple[int, int]  # the image's own (H, W)
    shown: Image.Image | None  # the image at the returned size, kept only when an overlay is asked for


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
    """

    def __init__(self, detector: Detector, batcher: Batcher, settings: ServeSettings, load: Load) -> None:
        self.detector = detector
        self.batcher = batcher
        self.settings = settings
        self.load = load
        self.decode_slots = asyncio.Semaphore(max(2, os.cpu_count() or 1))  # full-size decoded images held at once

    def decode(self, upload: Upload, keep_picture: bool) -> _Decoded:
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
        return _Decoded(array, picture.name, picture.size, shown)

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
        threshold: float | None,
        pixel_threshold: float | None,
        outputs: frozenset[str],
        deadline: float,
    ) -> list[dict[str, Any]]:
        """The JSON result of every image of a request (``images``: ``(name, bytes)``, emptied as they are decoded).

        Args:
            images: the uploads ``(name, encoded bytes)``.
            threshold: the image threshold to decide by (None: no decision).
            pixel_threshold: the mask threshold.
            outputs: which PNGs to return (``map``, ``mask``, ``overlay``).
            deadline: when the request's time is up, on :func:`time.monotonic`'s clock.
        """
        await run_in_threadpool(self.check_pixels, images)
        if not self.load.reserve(len(images)):
            raise busy(f"the server is decoding its limit of {self.load.max_images} images")
        try:
            return await self._score(images, threshold, pixel_threshold, outputs, deadline)
        finally:
            self.load.release(len(images))

    async def _score(
        self,
        images: list[tuple[str, bytes]],
        threshold: float | None,
        pixel_threshold: float | None,
        outputs: frozenset[str],
        deadline: float,
    ) -> list[dict[str, Any]]:
        decoded = []
        for index in range(len(images)):
            name, data = images[index]
            images[index] = (name, b"")  # the encoded bytes are not needed any more
            async with self.decode_slots:  # bounds the full-size decoded images held at once
                decoded.append(await run_in_threadpool(self.decode, Upload(data, name), "overlay" in outputs))
            del data
        with _http_errors(self.settings.request_timeout_s):
            if self.detector.tiling is None:
                scored = await self._batched([item.array for item in decoded], deadline - time.monotonic())
            else:
                scored = [await run_in_threadpool(self._tiled, item.array, deadline) for item in decoded]
        bodies = []
        for item, (score, small_map) in zip(decoded, scored, strict=True):
            result = Detector.decide(score, small_map, item.size, threshold, pixel_threshold)
            body = await run_in_threadpool(
                render_result, result, item.shown, outputs=outputs, max_side=self.settings.output_max_side
            )
            bodies.append({"name": item.name, **body})
        return bodies

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
        body = (await self.score([("self-test", buffer.getvalue())], None, None, frozenset(), deadline))[0]
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
