"""The evaluation folder and thresholds.json: both layouts read, typed selection, round trips."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cnc_ad.errors import ConfigError, DataError
from cnc_ad.metrics import METRIC_KEYS
from cnc_ad.results import Example, read_evaluation, write_evaluation
from cnc_ad.thresholds import ALL, Threshold, Thresholds, load_thresholds, save_thresholds

# What cnc-ad 0.1 wrote (values only), and is still read.
OLD_LAYOUT = {"image": {ALL: 1.0, "brick": 0.0, "washer": 99.0}, "pixel": {ALL: 0.9, "brick": 0.0}}


def _thresholds() -> Thresholds:
    return Thresholds(
        image={"brick": Threshold(0.4, "f1_max", 6), ALL: Threshold(0.5, "f1_max_pooled", 12)},
        pixel={"brick": Threshold(0.3, "f1_max", 5), "washer": Threshold(math.nan, "f1_max", 0),
               ALL: Threshold(0.3, "median", 11)},
    )  # fmt: skip


def test_old_layout_reads_and_selects(tmp_path: Path) -> None:
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(OLD_LAYOUT))
    thresholds = load_thresholds(path)
    assert thresholds == load_thresholds(tmp_path)  # a folder holding the file
    assert thresholds.select("image") == 1.0 and thresholds.select("pixel") == 0.9
    assert thresholds.select("image", "washer") == 99.0
    assert thresholds.select("pixel", "washer") is None  # no pixel threshold for washer
    assert thresholds.image["brick"] == Threshold(0.0, "", None)  # no recorded basis
    assert thresholds.categories == ["brick", "washer"]
    with pytest.raises(ConfigError, match="brick, washer"):
        thresholds.select("image", "carpet")


def test_round_trip_keeps_values_where_old_readers_find_them(tmp_path: Path) -> None:
    thresholds = _thresholds()
    path = save_thresholds(tmp_path, thresholds)
    raw = json.loads(path.read_text())
    assert raw["image"] == {"brick": 0.4, ALL: 0.5}  # the values layout of earlier versions
    assert raw["basis"]["image"][ALL] == {"rule": "f1_max_pooled", "images": 12}
    assert raw["basis"]["pixel"]["brick"] == {"rule": "f1_max", "images": 5}
    loaded = load_thresholds(tmp_path)
    assert loaded.image == thresholds.image
    assert loaded.pixel["brick"] == thresholds.pixel["brick"] and math.isnan(loaded.pixel["washer"].value)
    assert loaded.select("pixel", "washer") is None  # NaN is no threshold
    assert loaded.fallback("pixel", "washer") == 0.3 and loaded.fallback("pixel", "other") == 0.3


def test_missing_and_broken_thresholds(tmp_path: Path) -> None:
    assert load_thresholds(tmp_path) is None
    with pytest.raises(DataError, match="unreadable"):
        load_thresholds(tmp_path / "nope.json")
    (tmp_path / "thresholds.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="not a thresholds file"):
        load_thresholds(tmp_path)
    (tmp_path / "thresholds.json").write_text('{"image": {"a": "high"}}')
    with pytest.raises(DataError, match="not a thresholds file"):
        load_thresholds(tmp_path)
    assert Thresholds().select("image", "anything") is None  # nothing stored: no decision, no error


def test_evaluation_folder_round_trip(tmp_path: Path) -> None:
    row = dict.fromkeys(METRIC_KEYS, 0.5) | {"pixel_aupro": math.nan}
    metrics = {"categories": {"brick": row}, "mean": row, "left_out_of_mean": {"pixel_aupro": ["brick"]},
               "protocol": "ader", "checkpoint": "ck"}  # fmt: skip
    anomaly_map = np.random.default_rng(0).random((8, 8)).astype(np.float32)
    example = Example("a.png", 0.7, 1, "hole", "a_mask.png", "most", anomaly_map)
    curves = {"brick": {"image_roc": {"x": [0.0, 1.0], "y": [0.0, 1.0]}}}
    out = write_evaluation(tmp_path / "eval", metrics=metrics, thresholds=_thresholds(), curves=curves,
                           examples={"brick": [example]})  # fmt: skip
    stored = read_evaluation(out)
    assert stored.categories == ["brick"] and stored.missing == ()
    assert stored.metrics["protocol"] == "ader" and math.isnan(stored.metrics["mean"]["pixel_aupro"])
    assert stored.thresholds.select("image", "brick") == 0.4 and stored.curves == curves
    (entry,) = stored.examples["brick"]
    assert entry["rank"] == "most" and entry["defect"] == "hole" and entry["mask"] == "a_mask.png"
    np.testing.assert_allclose(np.load(out / entry["map"]), anomaly_map, atol=1e-3)  # float16 on disk
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == ["category", *METRIC_KEYS] and rows[1].startswith("brick,0.500000")
    assert rows[2].startswith("mean,") and rows[2].endswith(",nan")


def test_read_evaluation_refuses_what_is_not_one(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not an evaluation folder"):
        read_evaluation(tmp_path)
    (tmp_path / "metrics.json").write_text('{"categories": {}}')
    with pytest.raises(DataError, match="per-category"):
        read_evaluation(tmp_path)
    (tmp_path / "metrics.json").write_text('{"categories": {"a": {}}}')
    stored = read_evaluation(tmp_path)
    assert set(stored.missing) == {"curves.json", "examples.json", "thresholds.json"} and stored.examples == {}
