"""Data-parallel training, sharded evaluation and sharded prediction on CPU with gloo (2 processes via torchrun).

Two processes with a global batch of 4 (2 each) must reach the weights of one process with a batch of 4: the batches
are slices of the same global permutation and DDP averages the gradients. Dropout is off (its masks are drawn per
process) and so is the MoE balance term (each process balances its own tokens, as is usual for MoE).

Tolerance: 2e-4 absolute after 5 steps (across an epoch boundary). The all-reduce sums in another order; Adam divides
tiny gradients by their own size and top-2 routing is discontinuous, so those rounding differences grow a little
(3.7e-5 measured), while training with another data order moves every parameter by more than 5e-3.
A sharded evaluation must give the metrics of a single one, and a sharded prediction its scores.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from cnc_ad.checkpoint import latest_checkpoint, load_model

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")


def cnc(*args, nproc=1, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "cnc_ad",
            *args,
        ]
    else:
        command = [sys.executable, "-m", "cnc_ad", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


TRAIN = [
    *("--set", "model.preset=tiny", "--set", "model.bottleneck_dropout=0", "--set", "train.lambda_moe=0"),
    *("--set", "train.epochs=2", "--set", "train.batch_size=4", "--set", "data.num_workers=0"),
    *("--device", "cpu", "--no-progress", "--max-steps", "5"),
]


def test_two_processes_train_like_one(synth_root, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {preset: tiny}\n")
    cnc("train", "--config", str(config), "--data-root", str(synth_root), "--out", str(tmp_path / "one"), *TRAIN)
    cnc(
        "train",
        "--config",
        str(config),
        "--data-root",
        str(synth_root),
        "--out",
        str(tmp_path / "two"),
        *TRAIN,
        nproc=2,
    )
    one = load_model(latest_checkpoint(tmp_path / "one"), pretrained=False).state_dict()
    two = load_model(latest_checkpoint(tmp_path / "two"), pretrained=False).state_dict()
    trainable = [k for k in one if not k.startswith("encoder")]
    assert trainable
    for key in trainable:
        torch.testing.assert_close(one[key], two[key], atol=2e-4, rtol=0, msg=key)
    # Only rank 0 wrote the log: one line per step, not two.
    assert len((tmp_path / "two" / "log.jsonl").read_text().splitlines()) == len(
        (tmp_path / "one" / "log.jsonl").read_text().splitlines()
    )

    evaluate = ["eval", "--checkpoint", str(tmp_path / "one"), "--data-root", str(synth_root), "--device", "cpu",
                "--num-workers", "0", "--no-progress", "--metrics", "exact"]  # fmt: skip
    cnc(*evaluate, "--out", str(tmp_path / "eval1"))
    cnc(*evaluate, "--out", str(tmp_path / "eval2"), nproc=2)
    single = json.loads((tmp_path / "eval1" / "metrics.json").read_text())
    sharded = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    for cat, values in single["categories"].items():
        for key, value in values.items():
            assert sharded["categories"][cat][key] == pytest.approx(value, abs=1e-6, nan_ok=True), (cat, key)

    # Sharded prediction: every image once, the same scores as a single process.
    images = [str(p) for p in sorted((synth_root / "brick" / "test").rglob("*.png"))]
    common = ["predict", "--checkpoint", str(tmp_path / "one"), *images, "--device", "cpu", "--no-progress"]
    cnc(*common, "--out", str(tmp_path / "pred1"))
    cnc(*common, "--out", str(tmp_path / "pred2"), nproc=2)

    def scores(folder):
        lines = (tmp_path / folder / "predictions.jsonl").read_text().splitlines()
        return {r["path"]: r["score"] for r in map(json.loads, lines)}, len(lines)

    (one_scores, n1), (two_scores, n2) = scores("pred1"), scores("pred2")
    assert n1 == n2 == len(images) and one_scores.keys() == two_scores.keys()
    for path, value in one_scores.items():
        assert two_scores[path] == pytest.approx(value, abs=1e-6)
    assert (tmp_path / "pred2" / "predictions.csv").is_file()
