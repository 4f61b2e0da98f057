"""ONNX export: parity with PyTorch for the tiny and the offline preset, every score option, FNP text constants,
a dynamic batch, and `cnc export`'s parity check and exit status."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cnc_ad.cli import main
from cnc_ad.config import load_config
from cnc_ad.deploy.export import check_parity, export_onnx, random_images
from cnc_ad.errors import TextFeaturesError
from cnc_ad.model import build_model

TOLERANCE = 1e-4


def _model(*overrides: str, pretrained: bool = False) -> torch.nn.Module:
    model = build_model(load_config(None, list(overrides)).model, pretrained=pretrained)
    model.store_text_features()
    return model.eval()


@pytest.mark.parametrize(
    "overrides",
    [
        ("model.score=max",),
        ("model.score=top1", "model.fnp=true"),  # FNP reads the stored text features: constants in the graph
        ("model.score=pool16", "model.top_k=1", "model.map_size=64"),
    ],
    ids=["max", "top1-fnp", "pool16-top1expert"],
)
def test_tiny_parity_with_dynamic_batch(overrides: tuple[str, ...], tmp_path: Path) -> None:
    model = _model("model.preset=tiny", *overrides)
    path = export_onnx(model, tmp_path / "tiny.onnx", batch_size=2)
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["images"]
    assert [o.name for o in proto.graph.output] == ["score", "anomaly_map"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # No text tower: the tiny CLIP's token embedding (49408 x 64) is not among the weights.
    assert not any(49408 in init.dims for init in proto.graph.initializer)
    for batch in (1, 3):  # neither is the traced batch size
        parity = check_parity(model, path, random_images(batch, model.image_size, seed=batch))
        assert parity["max_abs_map"] <= TOLERANCE and parity["max_abs_score"] <= TOLERANCE, parity
    assert not model.training


def test_a_model_whose_text_features_were_never_stored_is_not_exported(tmp_path: Path) -> None:
    model = build_model(load_config(None, ["model.preset=tiny"]).model, pretrained=False)
    with pytest.raises(TextFeaturesError, match=r"never stored.*store_text_features"):
        export_onnx(model, tmp_path / "never.onnx")
    assert model.training and not (tmp_path / "never.onnx").exists() and not list(tmp_path.iterdir())


def test_offline_preset_parity(tmp_path: Path) -> None:
    model = _model("model.preset=cnc-effnet-lite0", pretrained=True)  # ImageNet weights from a local package
    path = export_onnx(model, tmp_path / "lite0.onnx")
    parity = check_parity(model, path, random_images(3, model.image_size))
    assert parity["max_abs_map"] <= TOLERANCE and parity["max_abs_score"] <= TOLERANCE, parity


def test_fixed_batch_export(tmp_path: Path) -> None:
    model = _model("model.preset=tiny")
    path = export_onnx(model, tmp_path / "fixed.onnx", dynamic_batch=False, batch_size=2)
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


def test_cli_export_checks_parity(
    checkpoint: Path, synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "model.onnx"
    args = ["-q", "export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)]
    assert main([*args, "--data-root", str(synth_root)]) == 0
    printed = capsys.readouterr().out
    assert "parity on 4 random images" in printed and "parity on 4 dataset images" in printed
    assert out.is_file()
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["cnc_ad.checkpoint"] == str(checkpoint) and "cnc_ad.config" in meta


def test_cli_export_fails_beyond_tolerance(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import cnc_ad.deploy.export

    monkeypatch.setattr(
        cnc_ad.deploy.export, "check_parity", lambda *a: {"max_abs_map": 0.5, "max_abs_score": np.float32(0)}
    )
    args = ["-q", "export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "model.onnx")]
    assert main(args) == 7  # ExportError
    assert "exceeds the tolerance" in capsys.readouterr().err
