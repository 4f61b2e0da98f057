"""Shared fixtures: a tiny synthetic dataset in the MVTec AD layout, written once per test session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnc_ad.data.synth import synthesize

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


def write_image(path: Path, size: tuple[int, int] = (16, 16), value: int | None = None, mode: str = "RGB") -> Path:
    """Write a small image (random content, or constant ``value``) of ``size`` (W, H); create parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "L": 1}[mode]
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    shape = (size[1], size[0], channels)
    array = np.full(shape, value, np.uint8) if value is not None else rng.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(array[..., 0] if channels == 1 else array).save(path)
    return path


def tiny_checkpoint(folder: Path, thresholds: dict | None = None) -> Path:
    """Save a tiny random-weight checkpoint into ``folder`` (with ``thresholds.json`` when given); return it."""
    import json

    from cnc_ad.checkpoint import save_checkpoint
    from cnc_ad.config import load_config
    from cnc_ad.model import build_model

    model = build_model(load_config(None, ["model.preset=tiny"]).model, pretrained=False)
    saved = save_checkpoint(folder, model)
    if thresholds is not None:
        (saved / "thresholds.json").write_text(json.dumps(thresholds))
    return saved
