"""Reliability and safety (issue 8): a real ``kill -9`` and resume, crash points inside a checkpoint save, damaged and
untrusted files, the bad-input catalogue through ``cnc predict``, and fuzzing of the CLI.

What other test files already prove is not repeated here; ``docs/reliability.md`` maps every fault to its test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnc_ad.checkpoint import latest_checkpoint, load_model, save_checkpoint
from cnc_ad.cli import main
from cnc_ad.config import load_config
from cnc_ad.data.images import decode_image
from cnc_ad.errors import CheckpointError, ConfigError, DataError, WeightsError
from cnc_ad.files import read_jsonl
from cnc_ad.model.encoders import create_clip
from cnc_ad.model.weights import load_efficientnet_lite0, load_weights_in_order
from cnc_ad.train import train
from tests.helpers import SUBPROCESS_ENV, run_cli

# Exit codes of the documented errors (cnc_ad.errors); anything else escaping main() is a bug.
DOCUMENTED_EXIT_CODES = {1, 2, 3, 4, 5, 6, 7, 8}


@pytest.fixture(scope="module")
def checkpoint(tiny_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight checkpoint with stored thresholds (so masks are written too)."""
    folder = save_checkpoint(tmp_path_factory.mktemp("run") / "ckpt", tiny_model)
    (folder / "thresholds.json").write_text(json.dumps({"image": {"__all__": 1.0}, "pixel": {"__all__": 1.0}}))
    return folder


def _cli(*argv: str) -> tuple[int, str]:
    """Run ``cnc -q ARGV`` in-process; return its exit code and what it wrote to stderr."""
    code, _, err = run_cli("-q", *argv)
    return code, err


def _assert_one_line_error(code: int, stderr: str, expected_code: int, *needles: str) -> None:
    assert code == expected_code, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and stderr.rstrip("\n").splitlines()[-1] == errors[0], stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.checkpoint_state_dict().items()}


# --------------------------------------------------------------------------------------------- interruption
TRAIN_YAML = """\
model: {preset: tiny}
data: {num_workers: 0}
train: {epochs: 12, batch_size: 4, checkpoint_every: 1, log_every: 1, device: cpu, schedule: cosine, warmup_steps: 2}
"""
STEPS_PER_EPOCH = 4  # 18 training images (synth_root) // batch 4
EPOCHS = 12


def _cnc(*argv: str) -> list[str]:
    return [sys.executable, "-m", "cnc_ad", "-q", *argv]


def _logged_steps(run: Path) -> list[int]:
    return [record["step"] for record in read_jsonl(run / "log.jsonl")]


def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_weights(synth_root: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(TRAIN_YAML)
    run = tmp_path / "killed"
    command = _cnc("train", "--config", str(config_file), "--data-root", str(synth_root), "--out", str(run))
    log = (tmp_path / "killed.log").open("w")
    process = subprocess.Popen([*command, "--no-progress"], env=SUBPROCESS_ENV, stdout=log, stderr=log)
    try:
        # Wait for the first checkpoint, then for a step of a later epoch that does not end an epoch: mid-epoch.
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            steps = _logged_steps(run)
            if (run / "latest").is_file() and any(s > STEPS_PER_EPOCH and s % STEPS_PER_EPOCH for s in steps):
                break
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    killed_at = max(_logged_steps(run))
    last_good = latest_checkpoint(run)
    saved_epoch = int(last_good.name.split("-")[1])
    assert 1 <= saved_epoch < EPOCHS and killed_at < EPOCHS * STEPS_PER_EPOCH
    assert not [p for p in (run / "checkpoints").iterdir() if not p.name.startswith(".") and p.name > last_good.name]

    resumed = subprocess.run(
        [*_cnc("train", "--resume", str(run)), "--no-progress"], env=SUBPROCESS_ENV, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert latest_checkpoint(run).name == f"epoch-{EPOCHS:04d}"
    # The resumed run starts right after the checkpoint: steps after it are logged again, none is skipped.
    steps = _logged_steps(run)
    assert steps[-1] == EPOCHS * STEPS_PER_EPOCH and set(steps) == set(range(1, EPOCHS * STEPS_PER_EPOCH + 1))

    reference = train(load_config(config_file, [f"data.root={synth_root}"]), tmp_path / "reference", progress=False)
    a = _trainable(load_model(reference.checkpoint))
    b = _trainable(load_model(run))
    assert a.keys() == b.keys()
    for key in a:  # exact equality on the CPU: same order of operations, same RNG streams
        assert torch.equal(a[key], b[key]), key


# Shared by the crash scripts: wrap a function so that the n-th counted call ends the process like kill -9 (no
# clean-up, no finally); calls are counted only while armed() is true.
CRASH_HELPER = r"""
import os

def make_crash(n, armed=lambda: True):
    calls = [0]
    def crash(fn):
        def wrapper(*args, **kwargs):
            if armed():
                calls[0] += 1
                if calls[0] == n:
                    os._exit(137)
            return fn(*args, **kwargs)
        return wrapper
    return crash
"""

FIRST_SAVE_SCRIPT = (
    CRASH_HELPER
    + r"""
import json, os, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from cnc_ad import checkpoint as ck
from cnc_ad import train as tr
from cnc_ad.config import load_config

config_file, data_root, base = sys.argv[1], sys.argv[2], Path(sys.argv[3])
config = load_config(config_file, [f"data.root={data_root}"])
results = []
for n in range(1, 200):
    run = base / f"run{n}"
    pid = os.fork()
    if pid == 0:  # the child trains and dies (like kill -9) at the n-th file-system step of its FIRST checkpoint save
        inside = [False]
        original = tr.save_checkpoint

        def first_save(*args, **kwargs):
            inside[0] = True
            original(*args, **kwargs)
            os._exit(0)  # n is past the last step of the save: no crash happened

        crash = make_crash(n, armed=lambda: inside[0])
        os.replace = crash(os.replace)
        os.fsync = crash(os.fsync)
        ck.save_file = crash(ck.save_file)
        tr.save_checkpoint = first_save
        tr.train(config, run, progress=False)
        os._exit(3)  # never reached: the first save ends the child
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    results.append({"n": n, "exit": code, "run": str(run)})
    if code != 137:
        break
print(json.dumps(results))
"""
)


def test_kill_at_every_stage_of_the_first_checkpoint_then_resume_gives_the_uninterrupted_weights(
    synth_root: Path, tmp_path: Path
) -> None:
    """A run killed while its first checkpoint is being written (files only in the temporary folder, or the folder
    renamed but ``latest`` not yet written) resumes: from step 0 with its saved config when no checkpoint is complete,
    else from the complete one; crash leftovers are removed; the final weights equal an uninterrupted run's."""
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(TRAIN_YAML.replace("epochs: 12", "epochs: 2"))
    base = tmp_path / "crashes"
    base.mkdir()
    out = subprocess.run(
        [sys.executable, "-c", FIRST_SAVE_SCRIPT, str(config_file), str(synth_root), str(base)],
        env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    crashes = [r for r in results if r["exit"] == 137]
    assert results[-1]["exit"] == 0 and len(crashes) >= 6, results  # every stage of the save, then one without
    reference = train(load_config(config_file, [f"data.root={synth_root}"]), tmp_path / "reference", progress=False)
    expected = _trainable(load_model(reference.checkpoint))
    for crash in crashes:
        run = Path(crash["run"])
        assert main(["-q", "train", "--resume", str(run), "--no-progress"]) == 0, crash
        assert latest_checkpoint(run).name == "epoch-0002"
        assert not list((run / "checkpoints").glob(".*.tmp")) and not list(run.glob(".*.tmp")), crash
        got = _trainable(load_model(run))
        assert all(torch.equal(expected[k], got[k]) for k in expected), crash


CRASH_SCRIPT = (
    CRASH_HELPER
    + r"""
import json, os, shutil, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from cnc_ad import checkpoint as ck
from cnc_ad.config import ModelConfig
from cnc_ad.model import build_model

base, target = Path(sys.argv[1]), sys.argv[2]
model = build_model(ModelConfig(preset="tiny"), pretrained=False)
template = base / "template"
ck.save_checkpoint(template / "checkpoints" / "epoch-0001", model, run_dir=template,
                   trainer_tensors={"epoch": torch.tensor([1])}, trainer_meta={"epoch": 1})
old = {k: v.clone() for k, v in model.checkpoint_state_dict().items()}
with torch.no_grad():
    for p in model.trainable_parameters():
        p.add_(1.0)
model.store_text_features()  # what save_checkpoint stores: text features from the changed prompts
new = {k: v.clone() for k, v in model.checkpoint_state_dict().items()}

def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

results = []
for n in range(1, 200):
    run = base / f"run{n}"
    shutil.copytree(template, run, symlinks=True)
    pid = os.fork()
    if pid == 0:  # the child dies (like kill -9: no clean-up, no finally) at its n-th file-system step
        crash = make_crash(n)
        os.replace = crash(os.replace)
        os.fsync = crash(os.fsync)
        ck.save_file = crash(ck.save_file)
        ck.save_checkpoint(run / "checkpoints" / target, model, run_dir=run,
                           trainer_tensors={"epoch": torch.tensor([2])}, trainer_meta={"epoch": 2})
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    try:
        loaded = ck.load_model(run, pretrained=False)
        tensors, meta = ck.load_trainer_state(run)
        state = ("old" if same(loaded.checkpoint_state_dict(), old)
                 else "new" if same(loaded.checkpoint_state_dict(), new) else "mixed")
        trainer = "old" if meta == {"epoch": 1} else "new" if meta == {"epoch": 2} else "mixed"
        if trainer != state or int(tensors["epoch"]) != (1 if trainer == "old" else 2):
            state = "mixed"
    except Exception as err:
        state = f"{type(err).__name__}: {err}"
    results.append({"n": n, "exit": code, "state": state})
    if code == 0:
        break
print(json.dumps(results))
"""
)


@pytest.mark.parametrize("target", ["epoch-0002", "epoch-0001"], ids=["new-folder", "same-folder"])
def test_a_crash_at_any_point_of_a_checkpoint_save_leaves_a_whole_checkpoint(tmp_path: Path, target: str) -> None:
    """The child process dies (``os._exit``, as under ``kill -9``) before each write, fsync and rename of a save in
    turn; after every crash the run folder's latest checkpoint loads, checksums match, and it is entirely the old or
    entirely the new one."""
    out = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(tmp_path), target],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert results[-1]["exit"] == 0 and results[-1]["state"] == "new"  # the save with no crash
    crashes = results[:-1]
    assert len(crashes) >= 8 and all(r["exit"] == 137 for r in crashes)
    assert all(r["state"] in ("old", "new") for r in crashes), [r for r in crashes if r["state"] not in ("old", "new")]
    assert crashes[0]["state"] == "old" and crashes[-1]["state"] == "new"


# --------------------------------------------------------------------------------------- damaged checkpoints
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) - 100])
    else:  # one byte altered in the middle of the tensor data: same size, valid safetensors, different numbers
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x10]) + data[middle + 1 :])
        assert path.stat().st_size == len(data)


@pytest.mark.parametrize("how", ["truncate", "alter-one-byte"])
def test_damaged_latest_checkpoint_is_refused_and_the_previous_one_loads(
    tiny_model: torch.nn.Module, synth_root: Path, tmp_path: Path, how: str
) -> None:
    run = tmp_path / "run"
    for epoch in (1, 2):
        save_checkpoint(run / "checkpoints" / f"epoch-{epoch:04d}", tiny_model, run_dir=run)
    (run / "config.yaml").write_text(TRAIN_YAML)
    latest = latest_checkpoint(run)
    _damage(latest / "model.safetensors", how)
    with pytest.raises(CheckpointError, match=r"SHA-256.*truncated or was altered") as err:
        load_model(run, pretrained=False)
    assert "\n" not in str(err.value)
    previous = run / "checkpoints" / "epoch-0001"
    assert previous.is_dir() and torch.equal(
        load_model(previous, pretrained=False).checkpoint_state_dict()["normal_text_0"],
        tiny_model.checkpoint_state_dict()["normal_text_0"],
    )
    image = tmp_path / "in" / "x.png"
    image.parent.mkdir()
    Image.new("RGB", (20, 20)).save(image)
    for argv in (
        ("predict", "--checkpoint", str(run), str(image), "--out", str(tmp_path / "p"), "--no-progress"),
        (
            "eval",
            "--checkpoint",
            str(run),
            "--data-root",
            str(synth_root),
            "--out",
            str(tmp_path / "e"),
            "--device",
            "cpu",
            "--no-progress",
        ),
    ):
        _assert_one_line_error(*_cli(*argv), 4, "SHA-256", str(latest))
    assert not (tmp_path / "p" / "predictions.jsonl").exists() and not (tmp_path / "e").exists()


def test_checkpoint_that_does_not_fit_the_model_is_one_line(tiny_model: torch.nn.Module, tmp_path: Path) -> None:
    """load_state_dict's multi-line size-mismatch report still reaches the user as one line."""
    folder = save_checkpoint(tmp_path / "ck", tiny_model)
    meta = json.loads((folder / "model.json").read_text())
    meta["config"]["prompt_length"] = 5  # valid config, but the stored prompt tensors have another shape
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_model(folder, pretrained=False)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    _assert_one_line_error(
        *_cli("predict", "--checkpoint", str(folder), str(image), "--out", str(tmp_path / "p")), 4, "does not fit"
    )


@pytest.mark.parametrize(
    ("change", "key"),
    [({"warp_drive": True}, "warp_drive"), ({"width": "wide"}, "model.width")],
    ids=["unknown-key", "wrong-type"],
)
def test_checkpoint_config_errors_name_the_key_through_the_cli(
    tiny_model: torch.nn.Module, tmp_path: Path, change: dict, key: str
) -> None:
    folder = save_checkpoint(tmp_path / "ck", tiny_model)
    meta = json.loads((folder / "model.json").read_text())
    meta["config"].update(change)
    (folder / "model.json").write_text(json.dumps(meta))
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    _assert_one_line_error(
        *_cli("predict", "--checkpoint", str(folder), str(image), "--out", str(tmp_path / "p")), 2, key
    )


# ----------------------------------------------------------------------------------------- untrusted files
class _Payload:
    """Unpickling this creates a folder: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_pickle_files_are_refused_before_any_code_runs(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    payload = pickle.dumps({"state_dict": _Payload(marker)})
    for name in ("model.pt", "model.ckpt", "model.safetensors", "weights"):  # named honestly, or disguised
        (tmp_path / name).write_bytes(payload)
    with zipfile.ZipFile(tmp_path / "scripted.safetensors", "w") as archive:  # torch.save / TorchScript: a zip
        archive.writestr("archive/data.pkl", payload)

    for name in ("model.pt", "model.ckpt", "model.safetensors", "weights", "scripted.safetensors"):
        with pytest.raises(CheckpointError, match="pickle"):
            load_model(tmp_path / name)
        # CLIP weights: refused without --trust-pickle (checked before open_clip is asked to load anything).
        with pytest.raises(WeightsError, match="trust_pickle=True"):
            create_clip("ViT-B-16", 224, str(tmp_path / name))
    # Backbone weights: only safetensors by default; the shipped EfficientNet .pth goes through weights_only loading.
    with pytest.raises(WeightsError, match="pickle files are refused"):
        load_weights_in_order(torch.nn.Linear(1, 1), tmp_path / "model.pt")
    with pytest.raises(WeightsError, match="cannot be read"):
        load_efficientnet_lite0(torch.nn.Linear(1, 1), tmp_path / "model.pt")
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    _assert_one_line_error(
        *_cli("predict", "--checkpoint", str(tmp_path / "model.pt"), str(image), "--out", str(tmp_path / "p")),
        4,
        "pickle",
    )
    assert not marker.exists()


# ------------------------------------------------------------------------------------- bad-input catalogue
def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _noise(height: int, width: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _catalogue(folder: Path) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """Write every kind of input into ``folder``: {good name: map (H, W)} and [bad names]."""
    folder.mkdir(parents=True, exist_ok=True)
    good: dict[str, tuple[int, int]] = {}
    (folder / "plain.png").write_bytes(_encoded(_noise(24, 40), "PNG"))
    good["plain.png"] = (24, 40)
    gray16 = Image.fromarray(np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)  # 16-bit grey, values to 59900
    (folder / "gray16.png").write_bytes(_encoded(gray16, "PNG"))
    good["gray16.png"] = (20, 30)
    (folder / "cmyk.jpg").write_bytes(_encoded(_noise(30, 20).convert("CMYK"), "JPEG"))
    good["cmyk.jpg"] = (30, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees: the map has the displayed (rotated) size
    (folder / "rotated.jpg").write_bytes(_encoded(_noise(20, 44), "JPEG", exif=exif))
    good["rotated.jpg"] = (44, 20)
    (folder / "palette.png").write_bytes(_encoded(_noise(16, 16).convert("P"), "PNG", transparency=0))
    good["palette.png"] = (16, 16)
    (folder / "one.png").write_bytes(_encoded(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"))
    good["one.png"] = (1, 1)
    try:  # a file name that is not UTF-8 (bytes 0xff 0xfe): kept as it is (surrogate-escaped)
        with open(os.fsencode(folder) + b"/raw\xff\xfe.png", "wb") as handle:
            handle.write(_encoded(_noise(12, 14), "PNG"))
        good[os.fsdecode(b"raw\xff\xfe.png")] = (12, 14)
    except (OSError, UnicodeError):
        pass  # the file system refuses such names: nothing to test here
    png, jpeg = _encoded(_noise(64, 64), "PNG"), _encoded(_noise(64, 64), "JPEG")
    (folder / "cut.png").write_bytes(png[: len(png) // 2])
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    (folder / "sub").mkdir()
    os.symlink(folder, folder / "sub" / "loop")  # a symbolic-link loop
    os.symlink("self", folder / "self")  # a link to itself
    (folder / "empty-dir").mkdir()
    return good, ["cut.png", "cut.jpg", "empty.png", "text.png"]


def test_bad_input_catalogue_through_cnc_predict(checkpoint: Path, tmp_path: Path) -> None:
    folder, out = tmp_path / "in", tmp_path / "out"
    first = folder / "first.png"
    folder.mkdir()
    first.write_bytes(_encoded(_noise(10, 10, seed=3), "PNG"))
    predict = ("predict", "--checkpoint", str(checkpoint), "--out", str(out), "--num-workers", "0", "--no-progress")
    assert _cli(*predict, str(first))[0] == 0
    before = (out / "predictions.jsonl").read_bytes()
    written = read_jsonl(out / "predictions.jsonl")
    files_before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.parent != out}

    good, bad = _catalogue(folder)
    code, stderr = _cli(*predict, "--resume", "--batch-size", "3", str(folder))
    assert code == 0 and "Traceback" not in stderr  # some inputs failed: a warning, exit 0 (3 with --strict)
    records = read_jsonl(out / "predictions.jsonl")
    # Nothing already written is lost or rewritten: the old lines are a prefix, the old files are unchanged.
    assert (out / "predictions.jsonl").read_bytes().startswith(before) and records[: len(written)] == written
    assert all(path.read_bytes() == data for path, data in files_before.items())
    by_name = {Path(r["path"]).name: r for r in records[len(written) :]}
    assert sorted(by_name) == sorted(good)  # each input once, despite the link loops
    for name, size in good.items():
        record = by_name[name]
        assert np.isfinite(record["score"]) and isinstance(record["is_anomalous"], bool)
        assert np.load(out / record["map"]).shape == size
        assert Image.open(out / record["mask"]).size == size[::-1]
        assert Image.open(out / record["overlay"]).size == size[::-1]
    errors = read_jsonl(out / "errors.jsonl")
    assert sorted(Path(e["path"]).name for e in errors) == sorted(bad)
    assert all("\n" not in e["error"] and e["path"] in e["error"] for e in errors)
    assert "empty (0 bytes)" in next(e["error"] for e in errors if e["path"].endswith("empty.png"))
    csv_lines = (out / "predictions.csv").read_text(encoding="utf-8").splitlines()
    assert len(csv_lines) == 1 + 1 + len(good)
    # Only bad files: exit 3 with one line; --strict turns the warning into exit 3; empty folders are an error.
    _assert_one_line_error(*_cli(*predict, "--overwrite", str(folder / "cut.png")), 3, "could not be decoded")
    _assert_one_line_error(*_cli(*predict, "--overwrite", "--strict", str(folder)), 3, "errors.jsonl")
    _assert_one_line_error(*_cli(*predict, "--overwrite", str(folder / "empty-dir")), 3, "no image files")


HUGE_SCRIPT = r"""
import os, resource, subprocess, sys
from PIL import Image
folder = sys.argv[1]
os.makedirs(folder + "/in")
Image.new("RGB", (12000, 12000), (40, 90, 160)).save(folder + "/in/huge.jpg", quality=90)
child = subprocess.Popen([sys.executable, "-m", "cnc_ad", "-q", "predict", "--checkpoint", sys.argv[2],
                          folder + "/in", "--out", folder + "/out", "--num-workers", "0", "--no-progress"])
_, status, usage = os.wait4(child.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def test_very_large_image_is_predicted_in_bounded_memory(checkpoint: Path, tmp_path: Path) -> None:
    """A 12000 x 12000 JPEG (144 Mpx, over Pillow's 89 Mpx warning level) through ``cnc predict`` in a subprocess:
    decoded at 1/8 scale (``draft``); the anomaly map at the image's own size (float32, 576 MB, held once by Pillow's
    resize and once as an array) is the only full-size data, so the peak stays under 2.5 GB (torch alone is ~0.7)."""
    out = subprocess.run(
        [sys.executable, "-c", HUGE_SCRIPT, str(tmp_path), str(checkpoint)],
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    code, max_rss_kb = map(int, out.stdout.splitlines()[-1].split())
    assert code == 0, out.stderr
    assert "Traceback" not in out.stderr
    (record,) = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    anomaly_map = np.load(tmp_path / "out" / record["map"], mmap_mode="r")
    assert anomaly_map.shape == (12000, 12000)
    assert Image.open(tmp_path / "out" / record["overlay"]).size == (2048, 2048)  # --overlay-max-side
    assert max_rss_kb < 2.5 * 2**20, f"peak memory {max_rss_kb / 2**20:.2f} GB"
    image, size = decode_image(tmp_path / "in" / "huge.jpg", target=32)  # what predict's loader asks for
    assert size == (12000, 12000) and image.size == (1500, 1500)  # decoded at 1/8 scale: 6.75 MB, not 432 MB


# --------------------------------------------------------------------------------------------- masks, scan
def _tree_with_masks(root: Path, mask_high: int) -> Path:
    for split, count in (("train/good", 3), ("test/good", 1), ("test/crack", 2)):
        for i in range(count):
            (root / "part" / split).mkdir(parents=True, exist_ok=True)
            _noise(16, 16, seed=i).save(root / "part" / split / f"{i:03d}.png")
    for i in range(2):
        mask = np.zeros((16, 16), np.uint8)
        mask[4:8, 4:8] = mask_high
        (root / "part" / "ground_truth" / "crack").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(root / "part" / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    return root


def test_scan_verify_accepts_zero_one_masks_and_names_a_mask_of_another_size(tmp_path: Path) -> None:
    root = _tree_with_masks(tmp_path / "d", mask_high=1)  # masks valued 0/1 instead of 0/255
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["-q", "data", "scan", str(root), "--verify", "--json"]) == 0
    assert json.loads(out.getvalue())["categories"]["part"]["masks"] == 2
    from cnc_ad.data import TestDataset, scan_dataset

    dataset = TestDataset(scan_dataset(root).test_samples(), 16, 16)
    masks = [item["mask"].sum().item() for item in dataset if item["label"] == 1]
    assert masks == [16.0, 16.0]  # the 0/1 masks are used as they are (4 x 4 defects), not as empty masks

    small = root / "part" / "ground_truth" / "crack" / "001_mask.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(small)
    _assert_one_line_error(*_cli("data", "scan", str(root), "--verify"), 3, "001_mask.png", "is 8x8 but its image")
    code, stderr = _cli("data", "scan", str(root), "--verify", "--skip-bad")
    assert code == 0 and "is 8x8" in stderr
    (tmp_path / "empty").mkdir()
    _assert_one_line_error(*_cli("data", "scan", str(tmp_path / "empty")), 3, "no dataset found")


# ------------------------------------------------------------------------------------------------- fuzzing
_NAMES = st.sampled_from(["train", "good", "test", "bad", "ground_truth", "crack", "masks", "part", "realiad_jsons"])
_FILES = st.sampled_from(["000.png", "000_mask.png", "a.jpg", "b.bmp", "c.tif", "meta.json", "part.json", "1cls.csv"])
_MAGIC = st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"GIF89a", b"BM", b"II*\x00", b"{"])
_CONTENT = st.one_of(
    st.tuples(_MAGIC, st.binary(max_size=200)).map(lambda t: t[0] + t[1]),
    st.sampled_from(["png", "png16", "jpeg", "truncated"]),
)
_LAYOUT = st.sampled_from([["part", "train", "good"], ["part", "test", "good"], ["part", "test", "crack"],
                           ["part", "ground_truth", "crack"]])  # fmt: skip
_FOLDERS = st.one_of(_LAYOUT, _LAYOUT, st.lists(_NAMES, max_size=4))  # mostly a plausible MVTec layout
_TREES = st.lists(st.tuples(_FOLDERS, _FILES, _CONTENT), min_size=1, max_size=10)
_LINKS = st.lists(st.tuples(st.lists(_NAMES, max_size=3), st.lists(_NAMES, max_size=2)), max_size=2)
_VALID = {
    "png": _encoded(Image.new("L", (16, 16), 255), "PNG"),
    "png16": _encoded(Image.fromarray(np.full((16, 16), 300, np.uint16)), "PNG"),
    "jpeg": _encoded(Image.new("RGB", (16, 16), (1, 2, 3)), "JPEG"),
}
_VALID["truncated"] = _VALID["jpeg"][:60]


def _write_tree(root: Path, files: list, links: list) -> None:
    for parts, name, content in files:
        path = root.joinpath(*parts, name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.is_dir():
                path.write_bytes(_VALID.get(content, content) if isinstance(content, str) else content)
        except (FileExistsError, NotADirectoryError, IsADirectoryError):
            continue
    for source, target in links:
        link = root.joinpath(*source, "link")
        if link.parent.is_dir() and not link.exists() and not link.is_symlink():
            link.symlink_to(root.joinpath(*target))


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(files=_TREES, links=_LINKS, command=st.sampled_from(["scan", "scan-skip", "predict"]))
def test_fuzz_cli_exits_cleanly_on_random_trees_and_bytes(checkpoint: Path, files, links, command) -> None:
    """Random trees of random bytes through ``cnc data scan --verify`` and ``cnc predict``: exit 0, or a documented
    error's exit code with a one-line message; any other exception escapes main() and fails the test."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        root.mkdir()
        _write_tree(root, files, links)
        if command == "predict":
            argv = ["predict", "--checkpoint", str(checkpoint), str(root), "--out", str(Path(tmp) / "out")]
            argv += ["--num-workers", "0", "--no-progress", "--batch-size", "4"]
        else:
            argv = ["data", "scan", str(root), "--verify"] + (["--skip-bad"] if command == "scan-skip" else [])
        code, stderr = _cli(*argv)
        assert "Traceback" not in stderr
        if code != 0:
            _assert_one_line_error(code, stderr, code)
            assert code in DOCUMENTED_EXIT_CODES
        elif command == "predict":
            done = read_jsonl(Path(tmp) / "out" / "predictions.jsonl")
            failed = read_jsonl(Path(tmp) / "out" / "errors.jsonl")
            assert done and len({r["path"] for r in done + failed}) == len(done) + len(failed)


def test_documented_exit_codes_match_the_errors() -> None:
    from cnc_ad import errors

    codes = {cls.exit_code for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, Exception)}
    assert codes == DOCUMENTED_EXIT_CODES
    assert issubclass(ConfigError, ValueError) and DataError.exit_code == 3 and CheckpointError.exit_code == 4


def test_result_files_get_the_usual_permissions(tmp_path):
    from cnc_ad.files import atomic_write_text, default_mode

    atomic_write_text(tmp_path / "a.json", "{}")
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == default_mode()
