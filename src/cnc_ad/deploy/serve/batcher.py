"""Dynamic batching: one worker thread gathers images submitted by concurrent requests into one model call.

A request submits each of its preprocessed images and waits on a future. The worker takes the first waiting image,
waits up to ``max_wait_s`` for more (up to ``max_batch_size``), runs the model once on the stacked batch, and
completes every future with its own row. When the model raises, the futures of that batch get a
:class:`ModelFailure` (an id; the error itself is logged under it) and the worker goes on with the next batch; it never
dies of a model error.

The worker can also hand freed memory back to the operating system (``release_memory``, e.g.
:func:`cnc_ad.deploy.serve.memory.release_free_memory`): whenever it falls idle after model calls, and under continuous
load at most every ``release_every_s`` seconds, because that call is not free (the next model call faults its memory
back in).
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# Scores preprocessed images (B, 3, S, S) -> (scores (B,), maps (B, M, M)), float32 NumPy.
ScoreFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
_POLL_S = 0.1  # how often an idle worker checks whether it should stop


class BatcherBusy(Exception):
    """More images are waiting than the queue holds; the caller should retry later."""


class BatcherClosed(Exception):
    """The batcher was stopped before this image was scored."""


class ModelFailure(Exception):
    """The model raised (or returned malformed output) on the batch that held this image.

    Args:
        failure_id: names the failure in the log, where its message and traceback are (clients see only the id).
    """

    def __init__(self, failure_id: str) -> None:
        super().__init__(f"model call {failure_id} failed; its error is in the server log")
        self.failure_id = failure_id


@dataclass
class BatchStats:
    """Counters since the batcher started: model calls, images scored, failed calls, the largest batch, releases.

    ``memory_releases`` counts the calls of the batcher's ``release_memory`` (freed memory handed back to the OS).
    """

    model_calls: int = 0
    images: int = 0
    failed_calls: int = 0
    largest_batch: int = 0
    memory_releases: int = 0

    def as_dict(self) -> dict[str, float]:
        mean = self.images / self.model_calls if self.model_calls else 0.0
        return {**self.__dict__, "mean_batch_size": round(mean, 3)}


class Batcher:
    """Runs ``score`` on batches gathered from concurrent :meth:`submit` calls, in one worker thread.

    Args:
        score: the model, on a stacked batch (B, 3, S, S) in [0, 1] -> scores (B,) and maps (B, M, M).
        max_batch_size: images per model call, at most.
        max_wait_s: after the first image of a batch arrives, how long to wait for more, in seconds.
        max_queue: images waiting at most; :meth:`submit` raises :class:`BatcherBusy` beyond.
        release_memory: called in the worker thread when it has had nothing to do for a poll interval (0.1 s) after
            model calls, and after a model call when ``release_every_s`` have passed since the last call; None: never.
        release_every_s: under continuous load, the shortest time between two ``release_memory`` calls, in seconds.
    """

    def __init__(
        self,
        score: ScoreFn,
        max_batch_size: int = 16,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
        release_memory: Callable[[], object] | None = None,
        release_every_s: float = 30.0,
    ):
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0 or release_every_s < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_wait_s and release_every_s >= 0")
        self.score = score
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.release_memory = release_memory
        self.release_every_s = release_every_s
        self.stats = BatchStats()
        self._queue: queue.Queue[tuple[np.ndarray, Future]] = queue.Queue(maxsize=max_queue)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        """Images waiting for the model (approximate)."""
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self.alive:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="cnc-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in progress, fail the images still waiting with :class:`BatcherClosed`, end the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        while True:
            try:
                _, future = self._queue.get_nowait()
            except queue.Empty:
                break
            if future.set_running_or_notify_cancel():
                future.set_exception(BatcherClosed("the server is shutting down"))

    def submit(self, image: np.ndarray) -> Future:
        """Queue one preprocessed image ``(3, S, S)``; the future gives ``(score, map (M, M))``.

        Cancel the future when its result is no longer wanted (the image is then skipped if not yet batched).

        Raises:
            BatcherBusy: the queue is full.
            BatcherClosed: the batcher is not running.
        """
        if self._stop.is_set() or not self.alive:
            raise BatcherClosed("the batcher is not running")
        future: Future = Future()
        try:
            self._queue.put_nowait((image, future))
        except queue.Full:
            raise BatcherBusy(f"{self._queue.maxsize} images are already waiting for the model") from None
        return future

    # --------------------------------------------------------------------------------------------------- worker
    def _next_batch(self) -> list[tuple[np.ndarray, Future]]:
        """Block for a first image, then gather more until the batch is full or ``max_wait_s`` has passed."""
        try:
            batch = [self._queue.get(timeout=_POLL_S)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        # Drop images whose requests have gone (cancelled futures); mark the rest running.
        return [(image, future) for image, future in batch if future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        used = False  # model calls since memory was last released
        last_release = time.monotonic()
        while not self._stop.is_set():
            batch = self._next_batch()
            if batch:
                self._run(batch)
                batch = []  # the images are not needed any more: free them before releasing memory
                used = True
                if time.monotonic() - last_release < self.release_every_s:
                    continue
            if used and self.release_memory is not None:  # idle after model calls, or due under load
                self._release(self.release_memory)
                used, last_release = False, time.monotonic()

    def _release(self, release: Callable[[], object]) -> None:
        try:
            release()
        except Exception:  # never the worker's end: memory stays where it is
            log.exception("releasing freed memory failed")
            return
        self.stats.memory_releases += 1

    def _run(self, batch: list[tuple[np.ndarray, Future]]) -> None:
        futures = [future for _, future in batch]
        try:
            scores, maps = self.score(np.stack([image for image, _ in batch]))
            scores, maps = np.asarray(scores), np.asarray(maps)
            if scores.shape != (len(batch),) or maps.ndim != 3 or maps.shape[0] != len(batch):
                raise ValueError(f"the model returned scores {scores.shape} and maps {maps.shape} for {len(batch)}")
        except Exception:  # any model error fails this batch only; the worker goes on
            failure_id = secrets.token_hex(4)
            log.exception("model call %s on a batch of %d images failed", failure_id, len(batch))
            self.stats.failed_calls += 1
            for future in futures:
                future.set_exception(ModelFailure(failure_id))
            return
        self.stats.model_calls += 1
        self.stats.images += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        for index, future in enumerate(futures):
            future.set_result((float(scores[index]), maps[index]))
