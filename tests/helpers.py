"""Helpers the tests import (``from tests.helpers import ...``); the fixtures built on them live in conftest.py."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

EPS_FILE = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nnewpath 0 0 moveto showpage\n%%EOF\n"
"""A minimal EPS (PostScript) file: Pillow reads it through Ghostscript, so no decoder of this package may accept it."""
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def write_image(path: Path, size: tuple[int, int] = (16, 16), value: int | None = None, mode: str = "RGB") -> Path:
    """Write a small image (random content, or constant ``value``) of ``size`` (W, H); create parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "L": 1}[mode]
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    shape = (size[1], size[0], channels)
    array = np.full(shape, value, np.uint8) if value is not None else rng.integers(0, 256, shape, dtype=np.uint8)
    Image.fromarray(array[..., 0] if channels == 1 else array).save(path)
    return path


def tiny_model():
    """A tiny random-weight CNC (``model.preset=tiny``), built after seeding torch with 0 (training mode)."""
    import torch

    from cnc_ad.config import ModelConfig
    from cnc_ad.model import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(preset="tiny"), pretrained=False)


def save_tiny_checkpoint(folder: Path, thresholds: dict | None = None) -> Path:
    """Save a tiny random-weight checkpoint into ``folder`` (with ``thresholds.json`` when given); return it."""
    from cnc_ad.checkpoint import save_checkpoint

    saved = save_checkpoint(folder, tiny_model())
    if thresholds is not None:
        (saved / "thresholds.json").write_text(json.dumps(thresholds))
    return saved


class CliResult(NamedTuple):
    """What one ``cnc`` command did: its exit code and what it wrote."""

    code: int
    out: str
    err: str


def run_cli(*argv: str | Path, subprocess_: bool = False, timeout: float = 300, **kwargs) -> CliResult:
    """Run ``cnc ARGV``: in-process through ``cnc_ad.cli.main`` (default), or as ``python -m cnc_ad ARGV`` in a
    subprocess with one thread (``subprocess_=True``; ``kwargs`` go to :func:`subprocess.run`, e.g. ``cwd``, ``env``).
    """
    args = [str(a) for a in argv]
    if subprocess_:
        kwargs.setdefault("env", SUBPROCESS_ENV)
        done = subprocess.run(
            [sys.executable, "-m", "cnc_ad", *args], capture_output=True, text=True, timeout=timeout, **kwargs
        )
        return CliResult(done.returncode, done.stdout, done.stderr)
    from cnc_ad.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return CliResult(code, out.getvalue(), err.getvalue())
