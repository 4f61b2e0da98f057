"""The batcher hands freed memory back to the OS when it falls idle, and under load at most every release_memory_s."""

from __future__ import annotations

import ctypes
import platform
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")

from cnc_ad import Detector
from cnc_ad.deploy.serve import memory
from cnc_ad.deploy.serve.app import create_app
from cnc_ad.deploy.serve.batcher import Batcher
from cnc_ad.deploy.serve.settings import ServeSettings
from cnc_ad.errors import ConfigError


def _score(batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(len(batch), np.float32), np.zeros((len(batch), 4, 4), np.float32)


def _image() -> torch.Tensor:
    return torch.zeros(3, 8, 8)


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition()`` holds (a generous deadline: a stuck worker fails the test, a slow one does not)."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"waited 30 s for {what}"
        time.sleep(0.01)


class Releases:
    """A stand-in for ``release_free_memory`` that counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return True


def test_an_idle_worker_releases_memory_once_after_model_calls():
    releases = Releases()
    batcher = Batcher(_score, max_batch_size=4, max_wait_s=0.0, release_memory=releases, release_every_s=3600)
    batcher.start()
    try:
        time.sleep(0.3)  # idle before any model call: nothing to release
        assert releases.calls == 0
        for future in [batcher.submit(_image()) for _ in range(3)]:
            future.result(30)
        _wait_for(lambda: releases.calls == 1, "the release once the worker is idle")
        time.sleep(0.3)  # several idle polls without model calls: no further release
        assert releases.calls == 1
        batcher.submit(_image()).result(30)
        _wait_for(lambda: releases.calls == 2, "the release after the next model call")
        assert batcher.stats.memory_releases == 2
    finally:
        batcher.stop()


def test_under_continuous_load_memory_is_released_at_most_every_release_every_s():
    gate = threading.Event()

    def held(batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        gate.wait(30)  # the first call waits until every image is queued: the worker never runs dry
        return _score(batch)

    for every_s, expected in ((3600, 1), (0, 6)):  # never due under load: once, when idle; due at once: every call
        releases = Releases()
        batcher = Batcher(held, max_batch_size=1, max_wait_s=0.0, release_memory=releases, release_every_s=every_s)
        batcher.start()
        gate.clear()
        try:
            futures = [batcher.submit(_image()) for _ in range(6)]
            gate.set()
            for future in futures:
                future.result(30)
            _wait_for(lambda r=releases, n=expected: r.calls >= n, f"{expected} release(s)")
            time.sleep(0.3)
            assert batcher.stats.model_calls == 6
            assert releases.calls == batcher.stats.memory_releases == expected
        finally:
            batcher.stop()


def test_a_failing_release_leaves_the_worker_running():
    def broken() -> bool:
        raise OSError("simulated")

    batcher = Batcher(_score, max_batch_size=2, max_wait_s=0.0, release_memory=broken, release_every_s=0)
    batcher.start()
    try:
        for _ in range(3):
            assert batcher.submit(_image()).result(30)[0] == 0.0
        assert batcher.alive and batcher.stats.memory_releases == 0
    finally:
        batcher.stop()


def test_release_free_memory_is_glibcs_malloc_trim_and_harmless_elsewhere():
    assert isinstance(memory.release_free_memory(), bool)
    assert isinstance(memory.release_free_memory(), bool)  # twice: nothing left to release is fine
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert memory._MALLOC_TRIM is not None
    elif platform.system() != "Linux":
        assert memory._MALLOC_TRIM is None and memory.release_free_memory() is False


def test_the_server_releases_memory_unless_told_not_to(tiny_checkpoint):
    detector = Detector.load(tiny_checkpoint, device="cpu")
    batcher = create_app(detector, ServeSettings(release_memory_s=5)).state.batcher
    assert batcher.release_memory is memory.release_free_memory and batcher.release_every_s == 5
    assert create_app(detector).state.batcher.release_every_s == ServeSettings().release_memory_s == 30
    assert create_app(detector, ServeSettings(release_memory_s=None)).state.batcher.release_memory is None
    with pytest.raises(ConfigError, match="release_memory_s"):
        ServeSettings(release_memory_s=-1)


class Mallopt:
    """A stand-in for glibc's ``mallopt`` that records its calls and succeeds."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return 1


def test_limit_arenas_calls_mallopt_m_arena_max_unless_the_environment_or_none_says_otherwise(monkeypatch):
    mallopt = Mallopt()
    monkeypatch.setattr(memory, "_MALLOPT", mallopt)
    assert memory.limit_arenas(2, environ={}) is True
    assert mallopt.calls == [(-8, 2)]  # M_ARENA_MAX in glibc's malloc.h
    assert memory.limit_arenas(None, environ={}) is False  # glibc's default kept
    assert memory.limit_arenas(1, environ={"MALLOC_ARENA_MAX": "4"}) is False  # glibc read the variable: it wins
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert memory.limit_arenas(1) is False  # os.environ by default
    assert mallopt.calls == [(-8, 2)]
    with pytest.raises(ValueError, match=">= 1"):
        memory.limit_arenas(0, environ={})


def test_limit_arenas_is_harmless_off_glibc(monkeypatch):
    monkeypatch.setattr(memory, "_MALLOPT", None)
    assert memory.limit_arenas(1, environ={}) is False
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert memory._glibc_function("mallopt", [], ctypes.c_int) is not None
    elif platform.system() != "Linux":
        assert memory._glibc_function("mallopt", [], ctypes.c_int) is None
    assert memory._glibc_function("no_such_function_in_any_libc", [], ctypes.c_int) is None


def test_the_server_shares_one_arena_unless_told_otherwise(monkeypatch, tiny_checkpoint):
    assert ServeSettings().malloc_arenas == 1 and ServeSettings(malloc_arenas=None).malloc_arenas is None
    with pytest.raises(ConfigError, match="malloc_arenas"):
        ServeSettings(malloc_arenas=0)
    pytest.importorskip("uvicorn")
    import uvicorn

    from cnc_ad.cli import main

    arenas: list[int | None] = []
    monkeypatch.setattr(memory, "limit_arenas", arenas.append)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: None)  # the CLI up to the point where it would serve
    for extra, expected in (([], 1), (["--malloc-arenas", "3"], 3), (["--malloc-arenas", "0"], None)):
        assert main(["serve", "--checkpoint", str(tiny_checkpoint), "--device", "cpu", "--port", "0", *extra]) == 0
        assert arenas.pop() == expected
