"""Shared fixtures: a tiny synthetic dataset in the MVTec AD layout (written once per test session), a tiny model, a
tiny checkpoint and a runner of the ``cnc`` command. Plain helpers are in ``tests/helpers.py``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cnc_ad.data.synth import synthesize
from tests import helpers

SYNTH_CATEGORIES = 3
SYNTH_PER_CATEGORY = 6
SYNTH_SIZE = 64


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One intra-op thread per test process (as `make test` sets OMP_NUM_THREADS=1): the tiny models are many times
    slower with two threads on a busy 2-core machine, and results do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic MVTec-layout dataset: 3 categories (brick, washer, grass), 6 train good + 2 test good + 4 defective
    test images (one per defect type, with masks) each, 64 x 64 px. Read-only: copy it before changing it."""
    root = tmp_path_factory.mktemp("synth") / "data"
    synthesize(root, categories=SYNTH_CATEGORIES, per_category=SYNTH_PER_CATEGORY, size=SYNTH_SIZE, seed=0)
    return root


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    """A tiny random-weight CNC (``model.preset=tiny``, torch seeded with 0), shared by the tests of one module."""
    return helpers.tiny_model()


@pytest.fixture(scope="module")
def tiny_thresholds() -> dict | None:
    """The ``thresholds.json`` content that :func:`tiny_checkpoint` stores: none here; a test module overrides this
    fixture to store some."""
    return None


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_thresholds: dict | None) -> Path:
    """A tiny random-weight checkpoint folder (with the module's ``tiny_thresholds``), shared by one module."""
    return helpers.save_tiny_checkpoint(tmp_path_factory.mktemp("run") / "ckpt", tiny_thresholds)


@pytest.fixture
def ghostscript_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every attempt to run Ghostscript (Pillow's EPS decoder) instead of running it: stays empty while only
    accepted formats are decoded."""
    from PIL import EpsImagePlugin

    calls: list[str] = []

    def ghostscript(*args: object, **kwargs: object) -> None:
        calls.append("Ghostscript")
        raise OSError("Ghostscript must not run")

    def has_ghostscript() -> bool:
        calls.append("has_ghostscript")
        return True

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", has_ghostscript)
    return calls


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., helpers.CliResult]:
    """``run_cli(*argv)``: run ``cnc ARGV`` in-process (or with ``subprocess_=True`` as ``python -m cnc_ad``) and
    return its exit code, stdout and stderr."""
    return helpers.run_cli
