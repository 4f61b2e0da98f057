"""Prediction: the Detector API on every input kind, thresholds, and `cnc predict` on folders (bad files, resume,
interruption, ONNX)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnc_ad import Detector
from cnc_ad.cli import main
from cnc_ad.deploy.detector import DetectionResult
from cnc_ad.deploy.predict import collect_inputs, open_output, output_name
from cnc_ad.errors import ConfigError, DataError, TextFeaturesError
from cnc_ad.files import read_jsonl
from cnc_ad.thresholds import Thresholds
from tests.helpers import EPS_FILE, SUBPROCESS_ENV, run_cli, write_image

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

THRESHOLDS = {"image": {"__all__": 1.0, "brick": 0.0, "washer": 99.0}, "pixel": {"__all__": 0.9, "brick": 0.0}}


@pytest.fixture(scope="module")
def tiny_thresholds() -> dict:
    return THRESHOLDS


@pytest.fixture(scope="module")
def detector(tiny_checkpoint: Path) -> Detector:
    return Detector.load(tiny_checkpoint, device="cpu")


def _rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _images(root: Path) -> dict[str, Path]:
    """Four images in two folders, two of them with the same file name, and one corrupt file."""
    paths = {"a/part.png": (40, 50), "b/part.png": (33, 21), "b/sub/other.jpg": (64, 64), "c.bmp": (20, 30)}
    written = {}
    for seed, (rel, (height, width)) in enumerate(paths.items()):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_rgb(height, width, seed)).save(path)
        written[rel] = path
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return written


def test_api_on_each_input_kind(detector: Detector, tmp_path: Path) -> None:
    rgb = _rgb(40, 50, 0)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    side = detector.image_size
    by_path = detector.predict(path)
    assert isinstance(by_path, DetectionResult)
    assert by_path.scores.shape == (1,) and by_path.maps[0].shape == (40, 50) and by_path.maps[0].dtype == np.float32
    # The same pixels through a file, a PIL image, an array and a float array give the same score.
    for same in (str(path), Image.fromarray(rgb), rgb, rgb.astype(np.float32) / 255.0):
        out = detector.predict(same)
        np.testing.assert_allclose(out.scores, by_path.scores, atol=1e-6)
        np.testing.assert_allclose(out.maps[0], by_path.maps[0], atol=1e-6)
    gray = detector.predict(rgb[..., 0])  # (H, W) uint8
    assert gray.maps[0].shape == (40, 50)
    batch = torch.rand(3, 3, side, side)
    out = detector.predict(batch, batch_size=2)
    assert out.scores.shape == (3,) and all(m.shape == (side, side) for m in out.maps)
    np.testing.assert_allclose(out.scores, detector.score(batch.numpy())[0], atol=1e-6)  # passed through unresized
    encoded = detector.predict(path.read_bytes())  # the file's bytes, as an upload
    np.testing.assert_allclose(encoded.scores, by_path.scores, atol=1e-6)
    mixed = detector.predict([path, rgb[:17, :23], torch.rand(3, 48, 40), Image.fromarray(rgb).convert("L")])
    assert [m.shape for m in mixed.maps] == [(40, 50), (17, 23), (48, 40), (40, 50)]
    assert mixed.scores.dtype == np.float32 and np.isfinite(mixed.scores).all()


def test_api_rejects_bad_inputs(detector: Detector, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"bad\.png"):
        detector.predict(bad)
    with pytest.raises(DataError, match="float"):
        detector.predict(np.full((8, 8, 3), 2.0, np.float32))
    with pytest.raises(DataError, match="shape"):
        detector.predict(np.zeros((8, 8, 2), np.uint8))


def test_api_refuses_a_format_not_accepted_without_running_ghostscript(
    detector: Detector, tmp_path: Path, ghostscript_calls: list[str]
) -> None:
    eps = tmp_path / "eps.png"
    eps.write_bytes(EPS_FILE)
    for item in (eps, EPS_FILE):
        with pytest.raises(DataError, match="in EPS format, which is not accepted"):
            detector.predict(item)
    assert ghostscript_calls == []


def test_thresholds_stored_explicit_and_per_category(detector: Detector) -> None:
    images = torch.rand(2, 3, detector.image_size, detector.image_size)
    out = detector.predict(images)  # stored __all__: image 1.0, pixel 0.9
    np.testing.assert_array_equal(out.is_anomalous, out.scores >= 1.0)
    assert all(
        mask.dtype == bool and np.array_equal(mask, m >= 0.9) for mask, m in zip(out.masks, out.maps, strict=True)
    )
    brick = detector.predict(images, category="brick")  # thresholds 0: everything anomalous
    assert brick.is_anomalous.all() and all(mask.all() for mask in brick.masks)
    washer = detector.predict(images, category="washer")  # no pixel threshold for washer: the image one is used
    assert not washer.is_anomalous.any() and not any(mask.any() for mask in washer.masks)
    explicit = detector.predict(images, threshold=-1.0, pixel_threshold=1e9)
    assert explicit.is_anomalous.all() and not any(mask.any() for mask in explicit.masks)
    with pytest.raises(ConfigError, match="brick"):
        detector.predict(images, category="carpet")
    bare = Detector(detector.backend, thresholds=None)
    assert bare.predict(images).is_anomalous is None and bare.predict(images).masks is None


def test_thresholds_beyond_float32_decide_without_overflow() -> None:
    small_map = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NumPy warned "overflow encountered in cast" comparing float32 with 1e300
        for pixel_threshold, anomalous in ((1e300, 0), (-1e300, 16), (0.5, 8), (float("inf"), 0)):
            result = Detector.decide(0.5, small_map, (4, 4), 1e300, pixel_threshold)
            assert result.mask() is not None and int(result.mask().sum()) == anomalous, pixel_threshold
            assert result.is_anomalous is False


def test_a_model_whose_text_features_were_never_stored_is_refused() -> None:
    from cnc_ad.deploy.backends import TorchBackend
    from tests.helpers import tiny_model

    with pytest.raises(TextFeaturesError, match=r"never stored.*store_text_features"):
        Detector(TorchBackend(tiny_model(), torch.device("cpu")))


def test_collect_inputs(tmp_path: Path) -> None:
    paths = _images(tmp_path / "in")
    found = collect_inputs([tmp_path / "in" / "a", str(tmp_path / "in" / "b" / "**" / "*.jpg"), paths["c.bmp"]])
    assert found == [paths["a/part.png"].resolve(), paths["b/sub/other.jpg"].resolve(), paths["c.bmp"].resolve()]
    assert len(collect_inputs([tmp_path / "in", tmp_path / "in" / "a"])) == 5  # recursive, deduplicated, bad included
    with pytest.raises(DataError, match="does not exist"):
        collect_inputs([tmp_path / "missing"])
    with pytest.raises(DataError, match="matches no image"):
        collect_inputs([str(tmp_path / "*.tiff")])
    assert output_name(paths["a/part.png"]) != output_name(paths["b/part.png"])


def _predict(checkpoint: Path, inputs: list[Path], out: Path, *extra: str) -> int:
    args = ["-q", "predict", "--model", str(checkpoint), *map(str, inputs), "--out", str(out)]
    return main([*args, "--num-workers", "0", "--no-progress", "--batch-size", "2", *extra])


def test_cli_predict_folder_with_corrupt_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    paths = _images(tmp_path / "in")
    out = tmp_path / "out"
    assert _predict(tiny_checkpoint, [tmp_path / "in"], out) == 0
    records = read_jsonl(out / "predictions.jsonl")
    assert sorted(r["path"] for r in records) == sorted(str(p.resolve()) for p in paths.values())
    errors = read_jsonl(out / "errors.jsonl")
    assert [e["path"] for e in errors] == [str((tmp_path / "in" / "b" / "broken.png").resolve())]
    assert "broken.png" in errors[0]["error"]
    assert len({r["map"] for r in records}) == 4  # a/part.png and b/part.png do not overwrite each other
    for record in records:
        height, width = Image.open(record["path"]).size[::-1]
        anomaly_map = np.load(out / record["map"])
        assert anomaly_map.shape == (height, width) and anomaly_map.dtype == np.float16
        mask = np.asarray(Image.open(out / record["mask"]))
        assert mask.shape == (height, width)
        assert Image.open(out / record["overlay"]).size == (width, height)
        assert record["is_anomalous"] == (record["score"] >= 1.0)
    csv_lines = (out / "predictions.csv").read_text().splitlines()
    assert csv_lines[0] == "path,score,is_anomalous,map,mask,overlay" and len(csv_lines) == 5
    assert _predict(tiny_checkpoint, [tmp_path / "in"], tmp_path / "strict", "--strict") == 3
    assert _predict(tiny_checkpoint, [tmp_path / "in" / "b" / "broken.png"], tmp_path / "none") == 3


def test_cli_resume_skips_done_files(tiny_checkpoint: Path, tmp_path: Path) -> None:
    paths = _images(tmp_path / "in")
    (tmp_path / "in" / "b" / "broken.png").unlink()
    out = tmp_path / "out"
    assert _predict(tiny_checkpoint, [paths["a/part.png"], paths["c.bmp"]], out) == 0
    first = read_jsonl(out / "predictions.jsonl")
    assert _predict(tiny_checkpoint, [tmp_path / "in"], out) == 2  # existing results: neither --resume nor --overwrite
    assert _predict(tiny_checkpoint, [tmp_path / "in"], out, "--resume") == 0
    records = read_jsonl(out / "predictions.jsonl")
    assert records[:2] == first and len(records) == 4  # the done ones were skipped, not predicted again
    assert len({r["path"] for r in records}) == 4
    assert _predict(tiny_checkpoint, [paths["c.bmp"]], out, "--overwrite") == 0
    assert len(read_jsonl(out / "predictions.jsonl")) == 1


@pytest.mark.parametrize("cut", ["mid-record", "inside a character"])
def test_cli_resume_after_a_power_loss_in_the_middle_of_a_line(tiny_checkpoint: Path, tmp_path: Path, cut: str) -> None:
    inputs = tmp_path / "in"
    first = write_image(inputs / "a.png", (20, 12))
    torn = write_image(inputs / "ü.png", (20, 12))  # a name of two-byte characters
    out = tmp_path / "out"
    assert _predict(tiny_checkpoint, [first], out) == 0
    kept = (out / "predictions.jsonl").read_bytes()
    line = (json.dumps({"path": str(torn.resolve()), "score": 0.5}, ensure_ascii=False)).encode()
    end = line.index("ü".encode()) + 1 if cut == "inside a character" else len(line) // 2
    with (out / "predictions.jsonl").open("ab") as handle:
        handle.write(line[:end])  # the power went off in the middle of appending the second image's line
    assert _predict(tiny_checkpoint, [inputs], out, "--resume") == 0
    data = (out / "predictions.jsonl").read_bytes()
    assert data.startswith(kept)  # every earlier record kept, byte for byte
    records = [json.loads(line) for line in data.decode().splitlines()]  # every line parses
    assert [r["path"] for r in records] == [str(first.resolve()), str(torn.resolve())]  # the torn one scored again


def test_cli_resume_predicts_a_file_again_once_it_changed(tiny_checkpoint: Path, tmp_path: Path) -> None:
    same, changed, old = (write_image(tmp_path / "in" / f"{n}.png", (20, 12)) for n in ("same", "changed", "old"))
    out = tmp_path / "out"
    assert _predict(tiny_checkpoint, [same, changed], out) == 0
    records = read_jsonl(out / "predictions.jsonl")
    for record, path in zip(records, (same, changed), strict=True):
        assert (record["size"], record["mtime_ns"]) == (path.stat().st_size, path.stat().st_mtime_ns)
    # A record written by 0.1 holds no size and mtime: it stands for any version of its file.
    with (out / "predictions.jsonl").open("a") as handle:
        handle.write(json.dumps({"path": str(old.resolve()), "score": 0.0}) + "\n")
    Image.fromarray(_rgb(12, 20, 99)).save(changed)  # another image under the same name
    assert _predict(tiny_checkpoint, [tmp_path / "in"], out, "--resume") == 0
    records = read_jsonl(out / "predictions.jsonl")
    assert [r["path"] for r in records] == [str(p.resolve()) for p in (same, changed, old, changed)]
    assert records[3]["size"] == changed.stat().st_size and records[3]["mtime_ns"] == changed.stat().st_mtime_ns


@pytest.mark.skipif(fcntl is None, reason="output folders are locked with fcntl")
def test_two_processes_cannot_share_one_output_folder(tiny_checkpoint: Path, tmp_path: Path) -> None:
    image, out = write_image(tmp_path / "a.png"), tmp_path / "out"
    holder = subprocess.Popen(  # another process holds the folder (e.g. a watcher)
        [sys.executable, "-c", "import sys; from pathlib import Path; from cnc_ad.deploy.predict import open_output\n"
         "with open_output(Path(sys.argv[1]), resume=True, overwrite=False):\n print('ready', flush=True); input()",
         str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=SUBPROCESS_ENV,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        for extra in ((), ("--resume",), ("--overwrite",)):
            result = run_cli("predict", "--model", tiny_checkpoint, image, "--out", out, "--no-progress", *extra)
            assert result.code == 2 and f"in use by another predictor or watcher (process {holder.pid})" in result.err
            assert "Traceback" not in result.err and not (out / "predictions.jsonl").exists()
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    assert _predict(tiny_checkpoint, [image], out) == 0  # the lock went with its process


@pytest.mark.skipif(fcntl is None, reason="output folders are locked with fcntl")
def test_a_second_open_of_the_same_folder_in_one_process_is_refused_too(tmp_path: Path) -> None:
    out = tmp_path / "out"
    refused = pytest.raises(ConfigError, match=f"process {os.getpid()}\\)")  # flock locks per open file
    with open_output(out, resume=True, overwrite=False), refused, open_output(out, resume=True, overwrite=False):
        pass
    with open_output(out, resume=True, overwrite=False) as done:  # released at the end of the block
        assert len(done) == 0


def test_cli_interrupted_run_keeps_written_results(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _images(tmp_path / "in")
    out = tmp_path / "out"
    real = Detector.score
    calls = []

    def crash_on_second_batch(self: Detector, images: np.ndarray):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(Detector, "score", crash_on_second_batch)
    assert _predict(tiny_checkpoint, [tmp_path / "in"], out) == 130
    kept = read_jsonl(out / "predictions.jsonl")
    assert len(kept) == calls[0] >= 1  # the first batch survives the crash, with its files and the CSV
    assert all((out / r["map"]).is_file() and (out / r["overlay"]).is_file() for r in kept)
    assert len((out / "predictions.csv").read_text().splitlines()) == 1 + len(kept)
    monkeypatch.setattr(Detector, "score", real)
    assert _predict(tiny_checkpoint, [tmp_path / "in"], out, "--resume") == 0
    records = read_jsonl(out / "predictions.jsonl")
    assert records[: len(kept)] == kept
    assert sorted(r["path"] for r in records) == sorted(str(p.resolve()) for p in paths.values())


def test_cli_predict_onnx_matches_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> None:
    _images(tmp_path / "in")
    onnx_file = tmp_path / "model.onnx"
    assert main(["-q", "export", "--checkpoint", str(tiny_checkpoint), "--out", str(onnx_file)]) == 0
    assert _predict(tiny_checkpoint, [tmp_path / "in"], tmp_path / "torch") == 0
    args = ["-q", "predict", "--model", str(onnx_file), str(tmp_path / "in"), "--out", str(tmp_path / "onnx")]
    assert main([*args, "--num-workers", "0", "--no-progress"]) == 0
    by_torch = {r["path"]: r for r in read_jsonl(tmp_path / "torch" / "predictions.jsonl")}
    by_onnx = {r["path"]: r for r in read_jsonl(tmp_path / "onnx" / "predictions.jsonl")}
    assert by_torch.keys() == by_onnx.keys() and len(by_torch) == 4
    for path, record in by_torch.items():
        assert abs(record["score"] - by_onnx[path]["score"]) <= 1e-4
        assert record["is_anomalous"] == by_onnx[path]["is_anomalous"]  # thresholds travel inside the graph
        torch_map = np.load(tmp_path / "torch" / record["map"]).astype(np.float32)
        onnx_map = np.load(tmp_path / "onnx" / by_onnx[path]["map"]).astype(np.float32)
        np.testing.assert_allclose(torch_map, onnx_map, atol=2e-3)  # float16 files
    detector = Detector.load(onnx_file)
    assert detector.thresholds == Thresholds.from_json(THRESHOLDS)
    images = torch.rand(5, 3, detector.image_size, detector.image_size)
    reference = Detector.load(tiny_checkpoint, device="cpu").predict(images)
    out = detector.predict(images, batch_size=5)
    np.testing.assert_allclose(out.scores, reference.scores, atol=1e-4)
    np.testing.assert_array_equal(out.is_anomalous, reference.is_anomalous)


def test_cli_large_image_overlay_is_capped(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = tmp_path / "in" / "large.jpg"
    path.parent.mkdir()
    Image.fromarray(_rgb(1200, 1600, 7)).save(path, quality=80)
    out = tmp_path / "out"
    assert _predict(tiny_checkpoint, [path], out, "--overlay-max-side", "200", "--map-dtype", "float32") == 0
    (record,) = read_jsonl(out / "predictions.jsonl")
    anomaly_map = np.load(out / record["map"])
    assert anomaly_map.shape == (1200, 1600) and anomaly_map.dtype == np.float32  # the image's own size
    assert Image.open(out / record["overlay"]).size == (200, 150)
