"""OpenVINO IR export: parity with PyTorch (tiny and the offline preset, random and synthetic images), a dynamic
batch, float32 weights by default, `cnc export --format openvino`'s parity check and exit status, and
`Detector.load(model.xml)` / `cnc predict --model model.xml` (same scores as the checkpoint, damaged files refused)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnc_ad import Detector
from cnc_ad.cli import main
from cnc_ad.config import load_config
from cnc_ad.data import ImageFileDataset, scan_dataset
from cnc_ad.deploy.export import check_parity, export_openvino, random_images
from cnc_ad.deploy.metadata import openvino_bin_path, openvino_metadata
from cnc_ad.errors import ConfigError, ExportError
from cnc_ad.files import read_jsonl
from cnc_ad.model import build_model
from cnc_ad.thresholds import Thresholds

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'cnc-ad[openvino]')")

TOLERANCE = 1e-4
THRESHOLDS = {"image": {"__all__": 1.0, "brick": 0.0}, "pixel": {"__all__": 0.9}}


def _model(*overrides: str, pretrained: bool = False) -> torch.nn.Module:
    model = build_model(load_config(None, list(overrides)).model, pretrained=pretrained)
    model.store_text_features()
    return model.eval()


def _synth_images(root: Path, size: int, count: int = 4) -> torch.Tensor:
    """Test images of the synthetic dataset (good and defective), preprocessed as the CLI does: (count, 3, S, S)."""
    index = scan_dataset(root)
    samples = [s for c in index.categories for s in index.test_samples(c)][::3][:count]
    dataset = ImageFileDataset([s.image for s in samples], size)
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def _assert_parity(model: torch.nn.Module, path: Path, images: torch.Tensor) -> None:
    parity = check_parity(model, path, images)
    assert parity["max_abs_map"] <= TOLERANCE and parity["max_abs_score"] <= TOLERANCE, parity


@pytest.mark.parametrize(
    ("preset", "overrides", "pretrained"),
    [
        ("tiny", ("model.score=top1", "model.fnp=true"), False),  # FNP: text features as constants in the graph
        ("cnc-effnet-lite0", (), True),  # ImageNet weights from a local package, as the ONNX test
    ],
    ids=["tiny-top1-fnp", "cnc-effnet-lite0"],
)
def test_parity_with_dynamic_batch(
    preset: str, overrides: tuple[str, ...], pretrained: bool, synth_root: Path, tmp_path: Path
) -> None:
    model = _model(f"model.preset={preset}", *overrides, pretrained=pretrained)
    thresholds = Thresholds.from_json(THRESHOLDS)
    path = export_openvino(model, tmp_path / "model.xml", batch_size=2, thresholds=thresholds)
    assert path == tmp_path / "model.xml" and openvino_bin_path(path).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.xml"]  # no temporary files left
    graph = ov.Core().read_model(str(path))
    size = model.image_size
    assert [i.get_any_name() for i in graph.inputs] == ["images"]
    assert str(graph.inputs[0].get_partial_shape()) == f"[?,3,{size},{size}]"
    assert [o.get_any_name() for o in graph.outputs] == ["score", "anomaly_map"]
    meta = openvino_metadata(graph)
    assert json.loads(meta["cnc_ad.config"])["preset"] == preset
    assert Thresholds.from_json(json.loads(meta["cnc_ad.thresholds"])) == thresholds
    for batch in (1, 3):  # neither is the traced batch size
        _assert_parity(model, path, random_images(batch, size, seed=batch))
    _assert_parity(model, path, _synth_images(synth_root, size))
    assert not model.training


def test_export_needs_an_xml_path(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"\.xml"):
        export_openvino(_model("model.preset=tiny"), tmp_path / "model.onnx")


@pytest.fixture(scope="module")
def tiny_thresholds() -> dict:
    return THRESHOLDS


@pytest.fixture(scope="module")
def ir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint exported by `cnc export --format openvino` (read-only: copy it before changing it)."""
    out = tmp_path_factory.mktemp("ir") / "model.xml"
    assert main(["-q", "export", "--checkpoint", str(tiny_checkpoint), "--format", "openvino", "--out", str(out)]) == 0
    return out


def test_cli_export_checks_parity(
    tiny_checkpoint: Path, synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "model.xml"
    args = ["-q", "export", "--checkpoint", str(tiny_checkpoint), "--format", "openvino", "--out", str(out)]
    assert main([*args, "--data-root", str(synth_root)]) == 0
    printed = capsys.readouterr().out
    assert "parity on 4 random images" in printed and "parity on 4 dataset images" in printed
    assert f"exported {out} (parity within 0.0001)" in printed
    meta = openvino_metadata(ov.Core().read_model(str(out)))
    assert meta["cnc_ad.checkpoint"] == str(tiny_checkpoint) and json.loads(meta["cnc_ad.thresholds"]) == THRESHOLDS


def test_cli_export_fails_beyond_tolerance(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import cnc_ad.deploy.export

    monkeypatch.setattr(cnc_ad.deploy.export, "check_parity", lambda *a: {"max_abs_map": 0.5, "max_abs_score": 0.0})
    args = [
        "-q",
        "export",
        "--checkpoint",
        str(tiny_checkpoint),
        "--format",
        "openvino",
        "--out",
        str(tmp_path / "m.xml"),
    ]
    assert main(args) == 7  # ExportError
    assert "OpenVINO parity 0.5 exceeds the tolerance" in capsys.readouterr().err
    assert (
        main(["-q", "export", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "m.onnx"), "--fp16"]) == 2
    )


def test_cli_export_fp16_reports_its_parity(
    tiny_checkpoint: Path, ir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "fp16.xml"
    args = ["-q", "export", "--checkpoint", str(tiny_checkpoint), "--format", "openvino", "--out", str(out), "--fp16"]
    assert main(args) == 0  # beyond the tolerance, but float16 weights are not held to it
    printed = capsys.readouterr().out
    parity = float(re.search(r"float16 weights: parity (\S+),", printed).group(1))
    assert parity > TOLERANCE, printed  # why float32 is the default
    assert openvino_bin_path(out).stat().st_size < 0.6 * openvino_bin_path(ir).stat().st_size


def test_cli_predict_openvino_matches_checkpoint(tiny_checkpoint: Path, ir: Path, tmp_path: Path) -> None:
    for seed, (name, shape) in enumerate({"a.png": (40, 50), "b/c.png": (33, 21), "d.jpg": (64, 64)}.items()):
        path = tmp_path / "in" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb = np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(path)
    common = [str(tmp_path / "in"), "--num-workers", "0", "--no-progress", "--batch-size", "2"]
    assert main(["-q", "predict", "--checkpoint", str(tiny_checkpoint), *common, "--out", str(tmp_path / "torch")]) == 0
    assert main(["-q", "predict", "--openvino", str(ir), *common, "--out", str(tmp_path / "ov")]) == 0
    by_torch = {r["path"]: r for r in read_jsonl(tmp_path / "torch" / "predictions.jsonl")}
    by_ov = {r["path"]: r for r in read_jsonl(tmp_path / "ov" / "predictions.jsonl")}
    assert by_torch.keys() == by_ov.keys() and len(by_torch) == 3
    for path, record in by_torch.items():
        assert abs(record["score"] - by_ov[path]["score"]) <= TOLERANCE
        assert record["is_anomalous"] == by_ov[path]["is_anomalous"]  # thresholds travel inside the IR
        torch_map = np.load(tmp_path / "torch" / record["map"]).astype(np.float32)
        ov_map = np.load(tmp_path / "ov" / by_ov[path]["map"]).astype(np.float32)
        np.testing.assert_allclose(torch_map, ov_map, atol=2e-3)  # float16 files
    detector = Detector.load(ir, openvino_config={"INFERENCE_NUM_THREADS": 1})
    assert detector.thresholds == Thresholds.from_json(THRESHOLDS) and detector.image_size == 32
    images = torch.rand(5, 3, detector.image_size, detector.image_size)
    reference = Detector.load(tiny_checkpoint, device="cpu").predict(images)
    out = detector.predict(images, batch_size=5)
    np.testing.assert_allclose(out.scores, reference.scores, atol=TOLERANCE)
    np.testing.assert_array_equal(out.is_anomalous, reference.is_anomalous)
    assert Detector.load(ir, thresholds={"image": {}, "pixel": {}}).threshold() is None
    assert Detector.load(ir, device="cpu").predict(images[:1]).scores == pytest.approx(out.scores[:1], abs=1e-6)
    with pytest.raises(ConfigError, match="not CUDA"):
        Detector.load(ir, device="cuda")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate-xml", "OpenVINO cannot load"),
        ("truncate-bin", "OpenVINO cannot load"),
        ("remove-bin", "model.bin not found"),
    ],
)
def test_damaged_ir_is_refused(
    damage: str, message: str, ir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    xml = tmp_path / "model.xml"
    shutil.copy(ir, xml)
    shutil.copy(openvino_bin_path(ir), openvino_bin_path(xml))
    target = openvino_bin_path(xml) if damage.endswith("bin") else xml
    if damage.startswith("remove"):
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(ExportError, match=message):
        Detector.load(xml)
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    assert main(["-q", "predict", "--openvino", str(xml), str(tmp_path / "in.png"), "--out", str(tmp_path / "o")]) == 7
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cnc predict: error: ") and message in err
