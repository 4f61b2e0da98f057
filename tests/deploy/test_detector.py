"""`Detector`'s model identity, the thresholds a decision is made by (and how they were found), and reloading them from
their file without a restart."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from cnc_ad import Detector
from cnc_ad.errors import ConfigError, DataError
from cnc_ad.thresholds import Threshold, Thresholds, load_thresholds
from tests.helpers import save_tiny_checkpoint

STORED = {
    "image": {"__all__": 0.5, "brick": 0.25, "screw": float("nan")},
    "pixel": {"__all__": 0.6, "brick": 0.3},
    "basis": {"image": {"__all__": {"rule": "false_alarm_rate=0.01", "images": 120},
                        "brick": {"rule": "false_alarm_rate=0.01;max+margin", "images": 12}}},
}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_thresholds() -> dict:
    return STORED


def test_model_id_names_the_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    first = Detector.load(tiny_checkpoint, device="cpu", pretrained=False)
    assert first.model_id is not None and len(first.model_id) == 16
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    assert Detector.load(copy, device="cpu", pretrained=False).model_id == first.model_id  # the same model elsewhere
    other = save_tiny_checkpoint(tmp_path / "other")  # same config, other weights: seeded alike, so alter the config
    meta = json.loads((other / "model.json").read_text())
    meta["config"]["map_size"] = meta["config"]["map_size"] // 2
    (other / "model.json").write_text(json.dumps(meta))
    assert Detector.load(other, device="cpu", pretrained=False).model_id != first.model_id
    assert Detector(first.backend).model_id is None  # a detector built around a backend does not know it


def test_an_exported_model_is_named_by_its_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime", reason="the ONNX backend (test extra)")
    from cnc_ad.checkpoint import load_model
    from cnc_ad.deploy.export import export_onnx

    graph = export_onnx(load_model(tiny_checkpoint, pretrained=False), tmp_path / "tiny.onnx")
    loaded = Detector.load(graph)
    assert loaded.model_id is not None and loaded.model_id == Detector.load(graph).model_id
    assert loaded.model_id != Detector.load(tiny_checkpoint, device="cpu", pretrained=False).model_id
    graph.write_bytes(graph.read_bytes() + b"\0")  # another file (ONNX ignores nothing: only the digest is checked)
    from cnc_ad.deploy.metadata import graph_digest

    assert graph_digest(graph) != loaded.model_id


def test_choose_thresholds_says_where_each_came_from(tiny_checkpoint: Path) -> None:
    detector = Detector.load(tiny_checkpoint, device="cpu", pretrained=False)
    digest = detector.thresholds.digest()
    shared = detector.choose_thresholds()
    assert (shared.image, shared.pixel, shared.source) == (0.5, 0.6, "__all__")
    assert (shared.rule, shared.images, shared.digest) == ("false_alarm_rate=0.01", 120, digest)
    brick = detector.choose_thresholds(category="brick")
    assert (brick.image, brick.pixel, brick.source, brick.rule, brick.images) == (
        0.25, 0.3, "category", "false_alarm_rate=0.01;max+margin", 12
    )  # fmt: skip
    asked = detector.choose_thresholds(0.9, category="brick")
    assert (asked.image, asked.pixel, asked.source, asked.rule, asked.images) == (0.9, 0.3, "request", "request", None)
    nan = detector.choose_thresholds(category="screw")  # NaN: no decision, the image threshold masks nothing either
    assert (nan.image, nan.pixel, nan.source, nan.rule) == (None, None, None, None)
    assert detector.resolve_thresholds(category="brick") == (0.25, 0.3)
    with pytest.raises(ConfigError, match="tyre"):
        detector.choose_thresholds(category="tyre")
    bare = Detector(detector.backend).choose_thresholds()
    assert (bare.image, bare.source, bare.digest) == (None, None, None)


def test_thresholds_digest_changes_with_values_rules_and_counts() -> None:
    base = Thresholds(image={"a": Threshold(0.5, "false_alarm_rate=0.01", 10)})
    assert base.digest() == Thresholds(image={"a": Threshold(0.5, "false_alarm_rate=0.01", 10)}).digest()
    for other in (Threshold(0.51, "false_alarm_rate=0.01", 10), Threshold(0.5, "f1_max", 10),
                  Threshold(0.5, "false_alarm_rate=0.01", 11)):  # fmt: skip
        assert Thresholds(image={"a": other}).digest() != base.digest()
    nan = Thresholds(image={"a": Threshold(math.nan)})
    assert nan.digest() == Thresholds(image={"a": Threshold(math.nan)}).digest()  # NaN != NaN, yet the same file


def test_reload_rereads_the_file_the_thresholds_came_from(tmp_path: Path) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", STORED)
    detector = Detector.load(checkpoint, device="cpu", pretrained=False)
    assert detector.thresholds_source == checkpoint / "thresholds.json"
    assert detector.reload_thresholds() is False  # unchanged
    stored = load_thresholds(checkpoint)
    raised = Thresholds(image={**stored.image, "brick": Threshold(0.75, "false_alarm_rate=0.01;max+margin", 3)},
                        pixel=stored.pixel)  # fmt: skip
    (checkpoint / "thresholds.json").write_text(json.dumps(raised.to_json()))
    before = detector.choose_thresholds(category="brick")
    assert detector.reload_thresholds() is True
    after = detector.choose_thresholds(category="brick")
    assert (before.image, after.image, after.images) == (0.25, 0.75, 3) and after.digest != before.digest

    (checkpoint / "thresholds.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        detector.reload_thresholds()
    assert detector.choose_thresholds(category="brick").image == 0.75  # the ones in use stay
    (checkpoint / "thresholds.json").write_text(json.dumps(raised.to_json()))

    # --thresholds FILE: that file is re-read; thresholds given in memory have none.
    given = tmp_path / "given.json"
    given.write_text(json.dumps({"image": {"__all__": 0.1}, "pixel": {}}))
    from_file = Detector.load(checkpoint, thresholds=given, device="cpu", pretrained=False)
    assert from_file.thresholds_source == given
    given.write_text(json.dumps({"image": {"__all__": 0.2}, "pixel": {}}))
    assert from_file.reload_thresholds() is True and from_file.choose_thresholds().image == 0.2
    in_memory = Detector(from_file.backend, {"image": {"__all__": 0.3}, "pixel": {}})
    with pytest.raises(ConfigError, match="in memory"):
        in_memory.reload_thresholds()


def test_reload_without_a_file_keeps_what_the_model_carries(tmp_path: Path) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
    detector = Detector.load(checkpoint, device="cpu", pretrained=False)
    assert detector.thresholds is None and detector.reload_thresholds() is False and detector.thresholds is None
    (checkpoint / "thresholds.json").write_text(json.dumps({"image": {"__all__": 0.4}, "pixel": {}}))
    assert detector.reload_thresholds() is True and detector.threshold() == 0.4
