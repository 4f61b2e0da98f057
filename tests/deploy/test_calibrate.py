"""Thresholds from good parts only: the quantile rule, the hold-out split, merging with F1-max values, the model path
and `cnc calibrate`."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from cnc_ad.data import Sample
from cnc_ad.data.samples import split_calibration
from cnc_ad.deploy.calibrate import (
    MARGIN,
    false_alarm_rule,
    normal_thresholds,
    sample_pixels,
    upper_quantile,
)
from cnc_ad.errors import ConfigError, DataError
from cnc_ad.thresholds import ALL, Threshold, Thresholds, load_thresholds, merge_thresholds, save_thresholds


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
    assert all(set(row) <= set(m.ravel()) and len(set(row)) == 10 for row, m in zip(picked, maps, strict=True))


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
    from cnc_ad.thresholds import update_thresholds

    update_thresholds(tmp_path, Thresholds(image={"b": Threshold(0.7, "false_alarm_rate=0.01", 10)}))
    stored = json.loads((tmp_path / "thresholds.json").read_text())
    assert stored["image"] == {"a": 0.4, "b": 0.7}
    assert stored["basis"]["image"]["a"]["rule"] == "f1_max"
    assert stored["basis"]["image"]["b"] == {"rule": "false_alarm_rate=0.01", "images": 10}
    assert load_thresholds(tmp_path).image["b"].is_labelled is False


# ------------------------------------------------------------------------------------- with a trained model
RATE = 0.1
TOLERANCE = 0.08
"""Measured false-alarm rates on unseen good images must lie within RATE +- TOLERANCE. With 100 held-out images per
category (200 pooled) and 100 unseen good test images, the binomial spread of the measured rate (sd about 0.03) plus
the error of a quantile estimated from 200 images (sd about 0.02) give sd about 0.037: the tolerance is about 2 sd.
Everything is seeded, so the test is deterministic on one machine; the tolerance is for other platforms."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model trained 10 steps on 2 synthetic categories of 200 good images, half of them held out, with
    thresholds set on those at a false-alarm rate of 0.1: (dataset root, run folder)."""
    from cnc_ad.cli import main
    from cnc_ad.data import synthesize

    base = tmp_path_factory.mktemp("calibrated")
    data = synthesize(base / "data", categories=2, per_category=200, size=32, seed=0)
    code = main(
        ["train", "--config", "demo", "--data-root", str(data), "--out", str(base / "run"), "--max-steps", "10",
         "--device", "cpu", "--no-progress", "--set", "model.preset=tiny", "--set", "data.num_workers=0",
         "--set", "train.batch_size=8", "--set", "data.calibration_share=0.5",
         "--set", f"train.false_alarm_rate={RATE}"]
    )  # fmt: skip
    assert code == 0
    return data, base / "run"


def _test_images(data: Path) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    from cnc_ad.data import scan_dataset

    good: dict[str, list[Path]] = {}
    bad: dict[str, list[Path]] = {}
    for sample in scan_dataset(data).test_samples():
        (bad if sample.label else good).setdefault(sample.category, []).append(sample.image)
    return good, bad


def test_training_sets_thresholds_that_hold_their_false_alarm_rate(trained: tuple[Path, Path]) -> None:
    from cnc_ad import Detector

    data, run = trained
    detector = Detector.load(run, device="cpu")  # reads only the false-alarm thresholds stored by training
    stored = detector.thresholds
    assert stored is not None and stored.categories == ["brick", "washer"]
    for category in ("brick", "washer", ALL):
        for kind in ("image", "pixel"):
            found = stored.table(kind)[category]
            assert found.rule == "false_alarm_rate=0.1" and found.is_finite
            assert found.images == (200 if category == ALL else 100)  # half of each category's 200 held out
    good, bad = _test_images(data)
    all_good = [p for paths in good.values() for p in paths]
    result = detector.predict(all_good)  # no category: the shared (ALL) thresholds
    assert result.is_anomalous is not None and result.masks is not None
    good_rate = float(result.is_anomalous.mean())
    assert abs(good_rate - RATE) <= TOLERANCE, good_rate
    pixel_rate = float(np.mean([mask.mean() for mask in result.masks]))
    assert abs(pixel_rate - RATE) <= TOLERANCE, pixel_rate
    # With each category's own thresholds, defective images are flagged more often than good ones (after 10 steps
    # of a tiny random-weight model: brick is told apart well, washer barely).
    flagged_good = np.concatenate([detector.predict(good[c], category=c).is_anomalous for c in ("brick", "washer")])
    flagged_bad = np.concatenate([detector.predict(bad[c], category=c).is_anomalous for c in ("brick", "washer")])
    assert flagged_bad.mean() > flagged_good.mean() + 0.1, (flagged_bad.mean(), flagged_good.mean())


def test_cli_calibrate_keeps_f1_max_values(trained: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    import shutil

    from cnc_ad.checkpoint import resolve_checkpoint
    from cnc_ad.cli import main

    data, trained_run = trained
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    checkpoint = resolve_checkpoint(run)
    from_training = load_thresholds(checkpoint)
    # The same held-out images, the same rate: the same values as training stored.
    assert main(["calibrate", "--checkpoint", str(run), "--data-root", str(data), "--false-alarm-rate", "0.1",
                 "--num-workers", "0", "--device", "cpu"]) == 0  # fmt: skip
    again = load_thresholds(checkpoint)
    for kind in ("image", "pixel"):
        for category, value in from_training.table(kind).items():
            assert again.table(kind)[category].value == pytest.approx(value.value, rel=1e-6)
    printed = capsys.readouterr().out
    assert "| category | images | image threshold | pixel threshold | rule |" in printed
    assert "| brick | 100 |" in printed and "| (any) | 200 |" in printed and "false_alarm_rate=0.1" in printed

    # An earlier `cnc eval` stored F1-max thresholds: calibrating keeps them and fills in the rest.
    save_thresholds(
        checkpoint,
        Thresholds(image={"brick": Threshold(0.123, "f1_max", 300), ALL: Threshold(0.456, "f1_max_pooled", 600)}),
    )
    good, _ = _test_images(data)
    washer_good = str(good["washer"][0].parent)
    assert main(["calibrate", "--checkpoint", str(run), "--normal", washer_good, "--category", "washer",
                 "--false-alarm-rate", "0.2", "--num-workers", "0", "--device", "cpu"]) == 0  # fmt: skip
    stored = load_thresholds(checkpoint)
    assert stored.image["brick"] == Threshold(0.123, "f1_max", 300)
    assert stored.image[ALL] == Threshold(0.456, "f1_max_pooled", 600)
    assert stored.image["washer"].rule == "false_alarm_rate=0.2"
    assert stored.image["washer"].images == 50  # its good test images
    assert stored.pixel[ALL].rule == "false_alarm_rate=0.2"  # there was none: filled in
    printed = capsys.readouterr().out
    assert "kept the F1-max thresholds" in printed and "__all__" in printed
    raw = json.loads((checkpoint / "thresholds.json").read_text())
    assert raw["basis"]["image"]["brick"]["rule"] == "f1_max"
    assert raw["basis"]["image"]["washer"]["rule"] == "false_alarm_rate=0.2"
    # --replace-f1-max replaces them.
    assert main(["calibrate", "--checkpoint", str(run), "--data-root", str(data), "--false-alarm-rate", "0.1",
                 "--replace-f1-max", "--num-workers", "0", "--device", "cpu"]) == 0  # fmt: skip
    assert load_thresholds(checkpoint).image["brick"].value == pytest.approx(from_training.image["brick"].value)


def test_cli_calibrate_errors(trained: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    from cnc_ad.cli import main

    data, run = trained
    assert main(["calibrate", "--checkpoint", str(run)]) != 0
    assert "--normal" in capsys.readouterr().err
    assert main(["calibrate", "--checkpoint", str(run), "--data-root", str(data), "--category", "brick"]) != 0
    assert main(["calibrate", "--checkpoint", str(run), "--normal", str(data), "--false-alarm-rate", "0.7"]) != 0
    assert "false-alarm rate" in capsys.readouterr().err
    few = tmp_path / "few"
    few.mkdir()
    for path in _test_images(data)[0]["brick"][:3]:
        (few / path.name).write_bytes(path.read_bytes())
    assert main(["calibrate", "--checkpoint", str(run), "--normal", str(few), "--num-workers", "0"]) != 0
    assert "fewer than the 5" in capsys.readouterr().err


def test_config_keys_are_validated_when_loaded() -> None:
    from cnc_ad.config import load_config

    config = load_config(None, ["data.calibration_share=0.2", "data.calibration_min=3", "train.false_alarm_rate=0.05"])
    assert (config.data.calibration_share, config.data.calibration_min, config.train.false_alarm_rate) == (0.2, 3, 0.05)
    for bad in ("data.calibration_share=0.6", "data.calibration_share=-0.1", "data.calibration_min=0",
                "train.false_alarm_rate=0", "train.false_alarm_rate=0.5"):  # fmt: skip
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])
