"""Tiled scoring of large images: tiles cover the image, maps are stitched in place, a small defect stays visible."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cnc_ad.data.transforms import prepare_image, to_chw
from cnc_ad.deploy.tiling import Tiling, map_score, score_tiled, tile_starts


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(1000, 256, 0.25), (256, 256, 0.5), (300, 256, 0.0), (9, 4, 0.5)]
)
def test_tiles_cover_the_image_and_end_flush(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = np.zeros(length, dtype=bool)
    for start in starts:
        covered[start : start + tile] = True
    assert covered.all() and starts[0] == 0 and starts[-1] + tile == max(length, tile)
    assert starts == sorted(set(starts))


def test_bad_tiling_arguments():
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 10, 1.0)
    with pytest.raises(ValueError, match="tile"):
        tile_starts(100, 0, 0.0)


def _darkness(tiles: np.ndarray) -> np.ndarray:
    """A stand-in model on prepared tiles (B, 3, S, S): the map is how dark each pixel is, at 32 x 32 (area means)."""
    dark = 1.0 - tiles.mean(axis=1)  # (B, S, S)
    side = dark.shape[-1] // 32
    return dark.reshape(len(dark), 32, side, 32, side).mean(axis=(2, 4))


def test_stitched_map_puts_a_small_defect_where_it_is_and_keeps_it_visible():
    image = np.full((1024, 1536, 3), 255, np.uint8)
    image[700:708, 1200:1208] = 0  # an 8 px defect: 0.004 % of the image
    score, stitched = score_tiled(_darkness, image, Tiling(256, 0.25), image_size=64)
    assert stitched.shape == (128, 192)  # 1/8 of the image: map_size / tile
    y, x = divmod(int(stitched.argmax()), stitched.shape[1])
    assert abs(y * 8 - 704) <= 16 and abs(x * 8 - 1204) <= 16
    # The whole image resized to the model's input averages the defect away; tiles keep 16x more of it.
    whole = to_chw(prepare_image(Image.fromarray(image), 64))[None]
    assert score > 4 * float(_darkness(whole).max())


def test_small_images_are_padded_to_one_tile_and_cropped_back():
    image = np.random.default_rng(0).integers(0, 256, (100, 120, 3), dtype=np.uint8)
    score, stitched = score_tiled(_darkness, image, Tiling(128, 0.5), image_size=64)
    assert stitched.shape == (25, 30) and score == pytest.approx(float(stitched.max()))


@pytest.mark.parametrize("rule", ["max", "top1", "pool16"])
def test_map_score_is_the_model_score_rule(rule):
    torch = pytest.importorskip("torch")
    from cnc_ad.model.anomaly_map import image_score

    maps = np.random.default_rng(1).random((3, 40, 56)).astype(np.float32)
    expected = image_score(torch.from_numpy(maps)[:, None], rule).numpy()
    assert [map_score(m, rule) for m in maps] == pytest.approx(expected.tolist(), rel=1e-5)
    with pytest.raises(ValueError, match="unknown score rule"):
        map_score(maps[0], "mean")


# ----------------------------------------------------------------------------------- a detector scoring by tiles
def _image_file(path, height: int, width: int, seed: int = 0):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_one_tile_of_the_model_input_size_is_plain_prediction(tiny_checkpoint):
    from cnc_ad.deploy import Detector

    detector = Detector.load(tiny_checkpoint, device="cpu")
    side = detector.image_size
    image = np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)
    plain = detector.predict(image)
    detector.tiling = Tiling(tile=side, overlap=0.0)
    tiled = detector.predict(image)
    assert tiled.maps[0].shape == (side, side)
    assert float(tiled.scores[0]) == pytest.approx(float(plain.scores[0]), rel=1e-5)
    assert abs(tiled.maps[0] - plain.maps[0]).max() < 1e-5


def test_tiled_prediction_gives_maps_at_the_image_size(tiny_checkpoint, tmp_path):
    from cnc_ad.deploy import Detector

    detector = Detector.load(tiny_checkpoint, device="cpu", tiling=Tiling(tile=40, overlap=0.5))
    path = _image_file(tmp_path / "big.png", 90, 150)
    result = detector.predict([path, str(path)], batch_size=4)
    assert [m.shape for m in result.maps] == [(90, 150), (90, 150)]
    assert result.scores[0] == result.scores[1] and float(result.scores[0]) == pytest.approx(
        float(result.maps[0].max()), rel=0.05
    )


def test_bad_tiling_settings_are_config_errors():
    from cnc_ad.errors import ConfigError

    with pytest.raises(ConfigError, match="positive number of pixels"):
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
    refused = run_cli("calibrate", "--model", tiny_checkpoint, "--normal", good, "--tile", "32")
    assert refused.code == 2 and "--save FILE" in refused.err
    saved = tmp_path / "tiled.json"
    done = run_cli(
        "calibrate", "--model", tiny_checkpoint, "--normal", good, "--tile", "32", "--save", saved,
        "--false-alarm-rate", "0.1", "--num-workers", "0",
    )  # fmt: skip
    assert done.code == 0, done.err
    rules = json.loads(saved.read_text())["basis"]["image"]
    assert rules and all(r["rule"].endswith(";tiles=32/0.25") for r in rules.values())
    assert not (tiny_checkpoint / "thresholds.json").exists()
    # Predicting by the same tiles with those thresholds: a map at the scan's size, no warning.
    out = tmp_path / "pred"
    done = run_cli(
        "predict", "--model", tiny_checkpoint, scan, "--tile", "32", "--thresholds", saved, "--out", out,
        "--num-workers", "0", "--no-progress",
    )  # fmt: skip
    assert done.code == 0, done.err
    assert "were not set with" not in done.err
    record = json.loads((out / "predictions.jsonl").read_text())
    assert record["is_anomalous"] is not None
    assert np.load(out / record["map"]).shape == (80, 120)
    # Other tiles than the thresholds were set with: a warning names the fix.
    done = run_cli(
        "predict", "--model", tiny_checkpoint, scan, "--tile", "48", "--thresholds", saved, "--out",
        tmp_path / "p2", "--num-workers", "0", "--no-progress",
    )  # fmt: skip
    assert done.code == 0 and "cnc calibrate --tile 48" in done.err
    assert run_cli("predict", "--model", tiny_checkpoint, scan, "--tile-overlap", "0.5").code == 2
