"""Tiled scoring of large images: tiles cover the image, maps are stitched in place, a small defect stays visible."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnc_ad.tiling import predict_tiled, tile_starts


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(1000, 256, 0.25), (256, 256, 0.5), (300, 256, 0.0), (9, 4, 0.5)]
)
def test_tiles_cover_the_image_and_end_flush(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = torch.zeros(length, dtype=torch.bool)
    for start in starts:
        covered[start : start + tile] = True
    assert covered.all() and starts[0] == 0 and starts[-1] + tile == max(length, tile)
    assert starts == sorted(set(starts))


def test_bad_tiling_arguments():
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 10, 1.0)
    with pytest.raises(ValueError, match="tile"):
        tile_starts(100, 0, 0.0)


def _darkness(images: torch.Tensor) -> torch.Tensor:
    """A stand-in model: the map is how dark each pixel is, at 32 x 32."""
    return F.interpolate(1.0 - images.mean(dim=1, keepdim=True), size=(32, 32), mode="area")[:, 0]


def test_stitched_map_puts_a_small_defect_where_it_is_and_keeps_it_visible():
    image = torch.ones(3, 1024, 1536)
    image[:, 700:708, 1200:1208] = 0.0  # an 8 px defect: 0.004 % of the image
    score, stitched = predict_tiled(_darkness, image, tile=256, overlap=0.25, image_size=64, map_size=32)
    assert stitched.shape == (128, 192)  # 1/8 of the image: map_size / tile
    y, x = divmod(int(stitched.argmax()), stitched.shape[1])
    assert abs(y * 8 - 704) <= 16 and abs(x * 8 - 1204) <= 16
    # The whole image resized to the model's input averages the defect away; tiles keep 16x more of it.
    whole = float(_darkness(F.interpolate(image[None], size=(64, 64), mode="bilinear", antialias=True)).max())
    assert score > 4 * whole


def test_small_images_are_padded_to_one_tile_and_cropped_back():
    image = torch.rand(3, 100, 120)
    score, stitched = predict_tiled(_darkness, image, tile=128, overlap=0.5, image_size=64, map_size=32)
    assert stitched.shape == (25, 30) and score == pytest.approx(float(stitched.max()))


# ----------------------------------------------------------------------------------- a detector scoring by tiles
def _image_file(path, height: int, width: int, seed: int = 0):
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def test_one_tile_of_the_model_input_size_is_plain_prediction(tiny_checkpoint):
    from cnc_ad.inference import Detector, Tiling

    detector = Detector.from_checkpoint(tiny_checkpoint, device="cpu")
    side = detector.image_size
    image = torch.rand(3, side, side, generator=torch.Generator().manual_seed(1))
    plain = detector.predict(image)
    detector.tiling = Tiling(tile=side, overlap=0.0)
    tiled = detector.predict(image)
    assert tiled.maps[0].shape == (side, side)
    assert float(tiled.scores[0]) == pytest.approx(float(plain.scores[0]), rel=1e-5)
    assert abs(tiled.maps[0] - plain.maps[0]).max() < 1e-5


def test_tiled_prediction_gives_maps_at_the_image_size(tiny_checkpoint, tmp_path):
    from cnc_ad.inference import Detector, Tiling

    detector = Detector.from_checkpoint(tiny_checkpoint, device="cpu")
    detector.tiling = Tiling(tile=40, overlap=0.5)
    path = _image_file(tmp_path / "big.png", 90, 150)
    result = detector.predict([path, str(path)], batch_size=4)
    assert [m.shape for m in result.maps] == [(90, 150), (90, 150)]
    assert result.scores[0] == result.scores[1] and float(result.scores[0]) == pytest.approx(
        float(result.maps[0].max()), rel=0.05
    )


def test_bad_tiling_settings_are_config_errors():
    from cnc_ad.errors import ConfigError
    from cnc_ad.inference import Tiling

    with pytest.raises(ConfigError, match="--tile 512"):
        Tiling(0)
    with pytest.raises(ConfigError, match="overlap"):
        Tiling(64, 1.0)


def test_cli_calibrate_and_predict_by_tiles(tiny_checkpoint, tmp_path, run_cli):
    import json

    import numpy as np

    good = tmp_path / "good"
    good.mkdir()
    for k in range(6):
        _image_file(good / f"g{k}.png", 70, 100, seed=k)
    scan = _image_file(tmp_path / "scan.png", 80, 120, seed=9)
    # Tiled thresholds are kept apart from the checkpoint's whole-image ones.
    refused = run_cli("calibrate", "--checkpoint", tiny_checkpoint, "--normal", good, "--tile", "32")
    assert refused.code == 2 and "--save FILE" in refused.err
    saved = tmp_path / "tiled.json"
    done = run_cli(
        "calibrate", "--checkpoint", tiny_checkpoint, "--normal", good, "--tile", "32", "--save", saved,
        "--false-alarm-rate", "0.1", "--num-workers", "0",
    )  # fmt: skip
    assert done.code == 0, done.err
    rules = json.loads(saved.read_text())["basis"]["image"]
    assert rules and all(r["rule"].endswith(";tiles=32/0.25") for r in rules.values())
    assert not (tiny_checkpoint / "thresholds.json").exists()
    # Predicting by the same tiles with those thresholds: a map at the scan's size, no warning.
    out = tmp_path / "pred"
    done = run_cli(
        "predict", "--checkpoint", tiny_checkpoint, scan, "--tile", "32", "--thresholds", saved, "--out", out,
        "--num-workers", "0", "--no-progress",
    )  # fmt: skip
    assert done.code == 0, done.err
    assert "were not set with" not in done.err
    record = json.loads((out / "predictions.jsonl").read_text())
    assert record["is_anomalous"] is not None
    assert np.load(out / record["map"]).shape == (80, 120)
    # Other tiles than the thresholds were set with: a warning names the fix.
    done = run_cli(
        "predict", "--checkpoint", tiny_checkpoint, scan, "--tile", "48", "--thresholds", saved, "--out",
        tmp_path / "p2", "--num-workers", "0", "--no-progress",
    )  # fmt: skip
    assert done.code == 0 and "cnc calibrate --tile 48" in done.err
    assert run_cli("predict", "--checkpoint", tiny_checkpoint, scan, "--tile-overlap", "0.5").code == 2
