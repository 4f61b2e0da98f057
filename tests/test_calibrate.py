"""Thresholds from good parts only: the quantile rule, the hold-out split, merging with F1-max values, the model path
and `cnc calibrate`."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from cnc_ad.calibrate import (
    MARGIN,
    false_alarm_rule,
    normal_thresholds,
    sample_pixels,
    split_calibration,
    upper_quantile,
)
from cnc_ad.data import Sample
from cnc_ad.errors import ConfigError, DataError
from cnc_ad.results import ALL, Threshold, Thresholds, load_thresholds, merge_thresholds, save_thresholds


# ------------------------------------------------------------------------------------------------ the rule
def test_upper_quantile_exact_values() -> None:
    scores = np.arange(1, 101, dtype=np.float64)  # 1..100
    value, estimated = upper_quantile(scores, 0.1)
    assert estimated and value == pytest.approx(90.1)  # 1 + 0.9 * 99: linear interpolation (NumPy's default)
    assert np.mean(scores >= value) == pytest.approx(0.1)
    value, estimated = upper_quantile(scores, 0.01)
    assert estimated and value == pytest.approx(99.01)
    assert np.mean(scores >= value) == pytest.approx(0.01)
    # 50 images cannot show a rate of 1 %: the maximum plus 5 % of the spread.
    value, estimated = upper_quantile(scores[:50], 0.01)
    assert not estimated and value == pytest.approx(50 + MARGIN * 49)
    assert np.mean(scores[:50] >= value) == 0.0
    value, _ = upper_quantile(np.full(3, 2.0), 0.1)
    assert value == pytest.approx(2.0 * (1 + MARGIN))
    assert upper_quantile(np.array([np.nan, 1.0, 2.0, 3.0, 4.0]), 0.25)[0] == pytest.approx(3.25)  # NaN ignored
    with pytest.raises(DataError):
        upper_quantile(np.array([np.nan]), 0.1)


def test_normal_thresholds_per_category_pooled_and_rules() -> None:
    a = np.arange(1, 11, dtype=np.float64)  # 10 images
    b = np.arange(101, 111, dtype=np.float64)
    maps_a = np.arange(40, dtype=np.float32).reshape(10, 2, 2)  # pixel values 0..39
    found = normal_thresholds({"a": a, "b": b, None: np.array([1000.0])}, {"a": maps_a}, 0.1)
    assert found.image["a"] == Threshold(pytest.approx(1 + 0.9 * 9), "false_alarm_rate=0.1", 10)
    assert found.image["b"].value == pytest.approx(101 + 0.9 * 9)
    assert found.pixel["a"] == Threshold(pytest.approx(0.9 * 39), "false_alarm_rate=0.1", 10)
    assert math.isnan(found.pixel["b"].value)  # no maps given for b
    pooled = np.concatenate([a, b, [1000.0]])  # the image of no category counts for ALL only
    assert found.image[ALL] == Threshold(pytest.approx(np.quantile(pooled, 0.9)), "false_alarm_rate=0.1", 21)
    assert found.pixel[ALL].value == pytest.approx(0.9 * 39)
    assert None not in found.image and found.categories == ["a", "b"]
    # A lower pixel rate; a rate the images cannot show says so in its rule.
    found = normal_thresholds({"a": a}, {"a": maps_a}, 0.05, pixel_false_alarm_rate=0.25)
    assert found.image["a"].rule == false_alarm_rule(0.05, estimated=False) == "false_alarm_rate=0.05;max+margin"
    assert found.image["a"].value == pytest.approx(10 + MARGIN * 9)
    assert found.pixel["a"] == Threshold(pytest.approx(0.75 * 39), "false_alarm_rate=0.25", 10)


def test_normal_thresholds_refuses_bad_input() -> None:
    with pytest.raises(DataError, match="fewer than the 5"):
        normal_thresholds({"a": np.arange(4.0)}, {}, 0.1)
    assert normal_thresholds({"a": np.arange(4.0)}, {}, 0.1, min_images=4).image["a"].images == 4
    for rate in (0.0, 0.5, -1.0, 2.0):
        with pytest.raises(ConfigError, match="false-alarm rate"):
            normal_thresholds({"a": np.arange(10.0)}, {}, rate)
    with pytest.raises(DataError, match="maps of shape"):
        normal_thresholds({"a": np.arange(10.0)}, {"a": np.zeros((3, 2, 2))}, 0.1)


def test_sample_pixels_bounds_memory_and_is_deterministic() -> None:
    maps = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)
    assert np.array_equal(sample_pixels(maps, per_image=64), maps.reshape(3, 64))  # small maps: every value
    picked = sample_pixels(maps, per_image=10, seed=1)
    assert picked.shape == (3, 10) and np.array_equal(picked, sample_pixels(maps, per_image=10, seed=1))
    assert all(set(row) <= set(m.ravel()) and len(set(row)) == 10 for row, m in zip(picked, maps))


# ---------------------------------------------------------------------------------------------- the split
def _samples(category: str, count: int) -> list[Sample]:
    return [Sample(Path(f"/d/{category}/train/good/{k:03d}.png"), category, "train", 0, "good") for k in range(count)]


def test_split_is_deterministic_and_honours_share_and_minimum() -> None:
    samples = _samples("big", 100) + _samples("mid", 20) + _samples("small", 9)
    train, held = split_calibration(samples, 0.1, 5)
    names = {c: [s.image.name for s in held if s.category == c] for c in ("big", "mid", "small")}
    assert names["big"] == [f"{k:03d}.png" for k in range(5, 100, 10)]  # 10 %: every 10th, centred
    assert names["mid"] == [f"{k:03d}.png" for k in (2, 6, 10, 14, 18)]  # at least the minimum of 5
    assert names["small"] == []  # fewer than 2 x 5 images: none held out
    assert len(train) + len(held) == len(samples) and not set(train) & set(held)
    assert train == [s for s in samples if s not in held]  # training order kept
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    assert split_calibration(shuffled, 0.1, 5)[1] == held  # the order of the input does not matter
    half = split_calibration(_samples("c", 20), 0.5, 2)[1]
    assert [s.image.name for s in half] == [f"{k:03d}.png" for k in range(1, 20, 2)]
    assert split_calibration(samples, 0.0, 5) == (samples, [])
    with pytest.raises(ConfigError, match=r"\[0, 0.5\]"):
        split_calibration(samples, 0.6, 5)


# -------------------------------------------------------------------------------------------- precedence
def test_merge_keeps_f1_max_values_and_fills_the_rest() -> None:
    evaluated = Thresholds(
        image={ALL: Threshold(0.5, "f1_max_pooled", 40), "a": Threshold(0.4, "f1_max", 20), "b": Threshold(math.nan)},
        pixel={ALL: Threshold(0.3, "median", 40)},
    )
    calibrated = Thresholds(
        image={ALL: Threshold(0.9, "false_alarm_rate=0.01", 30), "a": Threshold(0.8, "false_alarm_rate=0.01", 10),
               "b": Threshold(0.7, "false_alarm_rate=0.01", 10), "c": Threshold(0.6, "false_alarm_rate=0.01", 10)},
        pixel={ALL: Threshold(0.2, "false_alarm_rate=0.01", 30)},
    )  # fmt: skip
    merged = merge_thresholds(evaluated, calibrated)
    assert merged.image[ALL].rule == "f1_max_pooled" and merged.image["a"].value == 0.4  # F1-max kept
    assert merged.image["b"].value == 0.7 and merged.image["c"].value == 0.6  # NaN or missing: filled in
    assert merged.pixel[ALL].rule == "median"
    forced = merge_thresholds(evaluated, calibrated, replace_labelled=True)
    assert forced.image["a"].value == 0.8 and forced.pixel[ALL].value == 0.2
    # Evaluating after calibrating replaces the false-alarm values where F1-max ones are found, keeps the rest.
    again = merge_thresholds(calibrated, evaluated)
    assert again.image["a"].rule == "f1_max" and again.image["b"].value == 0.7 and again.image["c"].value == 0.6
    # Recalibrating replaces older false-alarm values; old files without a basis count as labelled.
    newer = Thresholds(image={"c": Threshold(0.1, "false_alarm_rate=0.1", 10)})
    assert merge_thresholds(calibrated, newer).image["c"].value == 0.1
    assert merge_thresholds(Thresholds(image={"c": Threshold(0.3)}), newer).image["c"].value == 0.3
    assert merge_thresholds(None, newer) == newer


def test_stored_file_says_which_rule_made_each_value(tmp_path: Path) -> None:
    save_thresholds(tmp_path, Thresholds(image={"a": Threshold(0.4, "f1_max", 20)}))
    from cnc_ad.results import update_thresholds

    update_thresholds(tmp_path, Thresholds(image={"b": Threshold(0.7, "false_alarm_rate=0.01", 10)}))
    stored = json.loads((tmp_path / "thresholds.json").read_text())
    assert stored["image"] == {"a": 0.4, "b": 0.7}
    assert stored["basis"]["image"]["a"]["rule"] == "f1_max"
    assert stored["basis"]["image"]["b"] == {"rule": "false_alarm_rate=0.01", "images": 10}
    assert load_thresholds(tmp_path).image["b"].is_labelled is False
