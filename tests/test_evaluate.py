"""The evaluation pipeline: threshold pooling, example selection, categories left out of the mean, and `cnc eval`
honouring the run's own eval config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cnc_ad.evaluate import CategoryResult, _finish_category, pool_thresholds, summarize
from cnc_ad.metrics import METRIC_KEYS, MetricAccumulator, f1_max_threshold
from cnc_ad.thresholds import ALL


def _category(scores, labels, image_t, pixel_t, pixel_images, **metrics) -> CategoryResult:
    values = dict.fromkeys(METRIC_KEYS, 0.5) | metrics
    return CategoryResult(values, image_t, pixel_t, {}, [], np.asarray(scores, np.float32),
                          np.asarray(labels, np.int64), pixel_images)  # fmt: skip


def test_pooled_thresholds_and_their_basis() -> None:
    details = {
        "a": _category([0.1, 0.2, 0.9], [0, 0, 1], 0.9, 0.3, 3),
        "b": _category([0.5, 0.6, 1.5, 2.0], [0, 0, 1, 1], 1.5, 0.7, 2),
        "c": _category([0.4], [0], math.nan, math.nan, 1),  # no anomalous image: no threshold
    }
    thresholds = pool_thresholds(details)
    scores = np.array([0.1, 0.2, 0.9, 0.5, 0.6, 1.5, 2.0, 0.4], np.float32)
    labels = np.array([0, 0, 1, 0, 0, 1, 1, 0])
    assert thresholds.image[ALL].value == pytest.approx(f1_max_threshold(scores, labels)[1])
    assert (thresholds.image[ALL].rule, thresholds.image[ALL].images) == ("f1_max_pooled", 8)
    assert thresholds.pixel[ALL].value == pytest.approx(0.5)  # median of 0.3 and 0.7; NaN left out
    assert (thresholds.pixel[ALL].rule, thresholds.pixel[ALL].images) == ("median", 6)
    assert thresholds.image["b"].value == 1.5 and thresholds.image["b"].images == 4
    assert thresholds.pixel["a"].images == 3 and thresholds.select("image", "c") is None
    only_normal = pool_thresholds({"c": details["c"]})
    assert math.isnan(only_normal.image[ALL].value) and math.isnan(only_normal.pixel[ALL].value)


def test_categories_with_an_undefined_metric_are_left_out_of_the_mean() -> None:
    details = {
        "a": _category([0.1, 0.9], [0, 1], 0.9, 0.3, 2, pixel_aupro=0.8, image_auroc=1.0),
        "b": _category([0.1, 0.9], [0, 1], 0.9, 0.3, 2, pixel_aupro=math.nan, image_auroc=0.5),
    }
    result = summarize(details, "ader")
    assert result.left_out == {"pixel_aupro": ["b"]}
    assert result.mean["pixel_aupro"] == pytest.approx(0.8) and result.mean["image_auroc"] == pytest.approx(0.75)
    assert result.protocol == "ader" and result.to_json("ck")["left_out_of_mean"] == {"pixel_aupro": ["b"]}


def test_examples_are_the_most_and_least_anomalous_without_repeats(tmp_path: Path) -> None:
    from cnc_ad.data.samples import Sample

    scores = np.array([0.3, 0.9, 0.1, 0.5, 0.7], np.float32)
    labels = np.array([0, 1, 0, 0, 1])
    samples = [Sample(tmp_path / f"{i}.png", "a", "test", int(labels[i]), "good", None) for i in range(5)]
    maps = np.stack([np.full((4, 4), s, np.float16) for s in scores])
    accumulator = MetricAccumulator()
    accumulator.update(scores, labels)
    result = _finish_category(accumulator, samples, scores, labels, maps, np.arange(5), examples=2)
    picked = [(Path(e["image"]).stem, e["rank"]) for e in result.examples]
    assert picked == [("1", "most"), ("4", "most"), ("2", "least"), ("0", "least")]
    assert all(float(e["map_array"][0, 0]) == pytest.approx(e["score"], abs=1e-3) for e in result.examples)
    few = _finish_category(accumulator, samples[:3], scores[:3], labels[:3], maps[:3], np.arange(3), examples=2)
    assert sorted(Path(e["image"]).stem for e in few.examples) == ["0", "1", "2"]  # each image once


def test_cnc_eval_honours_the_runs_eval_config(synth_root: Path, tmp_path: Path, run_cli) -> None:
    run = tmp_path / "run"
    tiny = ["--set", "model.preset=tiny", "--set", "data.num_workers=0", "--set", "train.batch_size=4"]
    assert run_cli("train", "--config", "demo", "--data-root", synth_root, "--out", run, "--max-steps", "1",
                   "--device", "cpu", "--no-progress", *tiny, "--set", "eval.protocol=dinomaly").code == 0  # fmt: skip
    common = ["eval", "--checkpoint", run, "--data-root", synth_root, "--device", "cpu", "--no-progress",
              "--set", "data.categories=[brick]"]  # fmt: skip
    assert run_cli(*common, "--out", tmp_path / "e1").code == 0
    assert json.loads((tmp_path / "e1" / "metrics.json").read_text())["protocol"] == "dinomaly"
    assert run_cli(*common, "--out", tmp_path / "e2", "--protocol", "ader").code == 0  # a flag wins
    metrics = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert metrics["protocol"] == "ader" and list(metrics["categories"]) == ["brick"]
    code, _, err = run_cli(*common, "--out", tmp_path / "e3", "--set", "eval.protocol=nope")
    assert code == 2 and "eval.protocol" in err
