"""The synthetic dataset: layout, exact masks, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnc_ad.data import scan_dataset, synthesize
from cnc_ad.data.synth import CATEGORIES, defects_of, render, split_counts
from cnc_ad.errors import DataError


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    args = {"categories": ["gravel", "gear"], "per_category": 2, "size": 48}
    a = _digest(synthesize(tmp_path / "a", seed=3, **args))
    b = _digest(synthesize(tmp_path / "b", seed=3, **args))
    c = _digest(synthesize(tmp_path / "c", seed=4, **args))
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_layout_and_counts(synth_root):
    index = scan_dataset(synth_root)
    assert index.categories == sorted(CATEGORIES[:3])
    good, per_defect = split_counts(6)
    for category, row in index.counts().items():
        assert row == {"train_good": 6, "test_good": good, "test_anomalous": 4 * per_defect, "masks": 4 * per_defect}
        assert {s.defect for s in index.test_samples(category) if s.label} == set(defects_of(category))
    mask = np.asarray(Image.open(next((synth_root / "brick" / "ground_truth" / "hole").iterdir())))
    assert mask.dtype == np.uint8 and set(np.unique(mask).tolist()) == {0, 255}


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_defect_is_visible_and_local(category):
    for d, defect in enumerate(defects_of(category)):
        image, mask = render(category, np.random.default_rng([7, d]), 128, defect)
        normal, _ = render(category, np.random.default_rng([7, d]), 128, None)
        assert image.shape == (128, 128, 3) and mask.shape == (128, 128)
        assert 0.002 < mask.mean() < 0.15, (category, defect, mask.mean())
        if defect == "missing_part":  # the same pose with one part left out: pixels change only inside the mask
            diff = np.abs(image.astype(int) - normal.astype(int)).max(axis=2)
            assert diff[mask].mean() > 30
            assert diff[~mask].max() <= 16  # sensor noise only


def test_arguments_are_checked(tmp_path):
    with pytest.raises(DataError, match="categories"):
        synthesize(tmp_path / "x", categories=99)
    with pytest.raises(DataError, match="unknown synthetic"):
        synthesize(tmp_path / "x", categories=["nope"])
    (tmp_path / "z" / "brick").mkdir(parents=True)  # a folder this function did not write
    with pytest.raises(DataError, match="overwrite=True"):
        synthesize(tmp_path / "z", categories=1, per_category=1, size=32)
    synthesize(tmp_path / "z", categories=1, per_category=1, size=32, overwrite=True)


def test_rerun_is_a_no_op_and_other_arguments_rewrite(tmp_path):
    out = synthesize(tmp_path / "y", categories=1, per_category=1, size=32)
    first = out / "brick" / "train" / "good" / "000.png"
    mtime = first.stat().st_mtime_ns
    synthesize(out, categories=1, per_category=1, size=32)
    assert first.stat().st_mtime_ns == mtime
    synthesize(out, categories=2, per_category=2, size=32)
    assert scan_dataset(out).counts()["brick"]["train_good"] == 2
    synthesize(out, categories=1, per_category=1, size=32)  # the earlier run's other categories go too
    assert scan_dataset(out).categories == ["brick"]
