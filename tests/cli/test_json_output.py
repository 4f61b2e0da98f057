"""`--json` on train, eval, calibrate, predict and export: exactly one JSON object on stdout, everything else (progress,
warnings, diagnostics) on stderr; an error gives the one object too, with "ok": false."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cnc_ad.cli import main
from tests.helpers import save_tiny_checkpoint, write_image

TINY = ["--set", "model.preset=tiny", "--set", "data.num_workers=0", "--set", "train.batch_size=4"]


def _one_object(stdout: str) -> dict[str, Any]:
    """The whole of stdout is one JSON object on one line."""
    assert stdout.endswith("\n") and stdout.count("\n") == 1, stdout
    value = json.loads(stdout)
    assert isinstance(value, dict)
    return value


@pytest.fixture(scope="module")
def run(synth_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("json") / "run"
    argv = ["train", "--config", "demo", "--data-root", str(synth_root), "--out", str(folder), "--max-steps", "2",
            "--device", "cpu", "--no-progress", "--set", "data.calibration_share=0", *TINY]  # fmt: skip
    assert main(argv) == 0
    return folder


def test_train_json(synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--config", "demo", "--data-root", str(synth_root), "--out", str(tmp_path / "run"),
            "--max-steps", "1", "--device", "cpu", "--json", "--set", "data.calibration_share=0.5",
            "--set", "data.calibration_min=2", *TINY]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    summary = _one_object(out)
    assert summary["command"] == "train" and summary["ok"] is True and summary["exit_code"] == 0
    assert summary["steps"] == 1 and Path(summary["checkpoint"]).is_dir()
    assert summary["run_dir"] == str(tmp_path / "run") and set(summary["last_loss"])
    # Training held out good images and set thresholds on them.
    assert summary["thresholds"]["basis"]["image"]["__all__"]["rule"].startswith("false_alarm_rate=")
    assert "trained" not in out and err  # the prose is gone; the log lines went to stderr


def test_eval_json(run: Path, synth_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", "--checkpoint", str(run), "--data-root", str(synth_root), "--out", str(tmp_path / "eval"),
            "--device", "cpu", "--num-workers", "0", "--json"]  # fmt: skip
    assert main(argv) == 0
    summary = _one_object(capsys.readouterr().out)
    assert summary["command"] == "eval" and summary["ok"] is True
    assert set(summary["categories"]) == {"brick", "washer", "grass"}
    assert 0.0 <= summary["mean"]["image_auroc"] <= 1.0
    assert summary["out"] == str(tmp_path / "eval") and Path(summary["thresholds_file"]).is_file()
    assert set(summary["thresholds"]["image"]) >= {"brick", "__all__"}


def test_calibrate_json(run: Path, synth_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = synth_root / "brick" / "train" / "good"
    argv = ["calibrate", "--checkpoint", str(run), "--normal", str(good), "--category", "brick", "--min-images", "2",
            "--num-workers", "0", "--device", "cpu", "--replace-f1-max", "--json"]  # fmt: skip
    assert main(argv) == 0
    summary = _one_object(capsys.readouterr().out)
    assert summary["command"] == "calibrate" and summary["false_alarm_rate"] == 0.01
    brick = summary["categories"]["brick"]
    assert brick["images"] == 6 and brick["image_rule"].startswith("false_alarm_rate=0.01")
    assert isinstance(brick["image_threshold"], float) and summary["kept_f1_max"] == []
    assert Path(summary["thresholds_file"]).is_file()


def test_predict_json_and_its_warning_on_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", {"image": {"__all__": 0.0}})
    images = tmp_path / "images"
    write_image(images / "a.png")
    write_image(images / "b.png")
    (images / "broken.png").write_bytes(b"not an image")
    argv = ["predict", "--checkpoint", str(checkpoint), str(images), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--num-workers", "0"]  # fmt: skip
    assert main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    summary = _one_object(out)
    assert summary == {
        "command": "predict",
        "ok": True,
        "exit_code": 0,
        "out": str(tmp_path / "out"),
        "predictions": str(tmp_path / "out" / "predictions.jsonl"),
        "inputs": 3,
        "predicted": 2,
        "anomalous": 2,
        "done_before": 0,
        "failed": 1,
    }
    assert "could not be decoded" in err and "broken.png" in err

    # Without --json the warning is on stderr too (it used to be printed on stdout); the summary line stays.
    assert main([*argv, "--overwrite"]) == 0
    out, err = capsys.readouterr()
    assert "could not be decoded" not in out and "warning: 1 of 3 inputs could not be decoded" in err
    assert out.strip().startswith("2 predicted (2 anomalous)")

    # An error: still one object, with "ok": false, the exit code and the message; the one-line error on stderr.
    assert main([*argv, "--resume", "--strict", "--json"]) == 3
    out, err = capsys.readouterr()
    summary = _one_object(out)
    assert summary["ok"] is False and summary["exit_code"] == 3 and summary["done_before"] == 2
    assert summary["error"]["type"] == "DataError" and "could not be decoded" in summary["error"]["message"]
    assert "cnc predict: error:" in err
    assert main(["predict", "--checkpoint", str(tmp_path / "missing"), str(images), "--json"]) == 4
    summary = _one_object(capsys.readouterr().out)
    assert summary["ok"] is False and summary["error"]["type"] == "CheckpointError"


def test_export_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
    argv = ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "model.onnx"), "--parity-images", "3"]
    assert main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    summary = _one_object(out)
    assert summary["format"] == "onnx" and summary["files"] == [str(tmp_path / "model.onnx")]
    assert summary["within_tolerance"] is True and summary["max_abs_diff"] <= 1e-4
    assert summary["parity"]["random"]["images"] == 3
    assert "parity on 3 random images" in err


def test_json_in_a_real_process_keeps_native_output_off_stdout(tmp_path: Path) -> None:
    """File descriptor 1 itself is sent to stderr while the command runs: output of native libraries too."""
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt")
    images = tmp_path / "images"
    write_image(images / "a.png")
    (images / "empty.png").write_bytes(b"")
    code = (
        "import os, sys\n"
        "from cnc_ad.deploy import predict\n"
        "real = predict.predict_files\n"
        "def noisy(*a, **k):\n"
        "    os.write(1, b'native noise\\n'); print('python noise')\n"
        "    return real(*a, **k)\n"
        "predict.predict_files = noisy\n"
        "from cnc_ad.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    argv = ["predict", "--checkpoint", str(checkpoint), str(images), "--out", str(tmp_path / "out"), "--device", "cpu",
            "--num-workers", "0", "--json"]  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = _one_object(result.stdout)
    assert summary["predicted"] == 1 and summary["failed"] == 1
    assert "native noise" in result.stderr and "python noise" in result.stderr
    assert "could not be decoded" in result.stderr
