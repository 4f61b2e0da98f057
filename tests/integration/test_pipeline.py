"""The main job through the command line: synth -> train -> eval -> report, and the ablation grid."""

import json
import math

from cnc_ad.cli import main
from cnc_ad.metrics import METRIC_KEYS

TINY = ["--set", "model.preset=tiny", "--set", "data.num_workers=0", "--set", "train.batch_size=4"]


def test_synth_train_eval_report(tmp_path, capsys):
    data, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "eval"
    assert main(["data", "synth", str(data), "--categories", "2", "--per-category", "4", "--size", "64"]) == 0
    config = tmp_path / "c.yaml"
    config.write_text("model: {preset: tiny}\ntrain: {epochs: 1}\n")
    code = main(
        [
            "train",
            "--config",
            str(config),
            "--data-root",
            str(data),
            "--out",
            str(run),
            "--max-steps",
            "2",
            "--device",
            "cpu",
            "--no-progress",
            *TINY,
        ]
    )
    assert code == 0
    assert "trained 2 steps" in capsys.readouterr().out
    code = main(
        [
            "eval",
            "--checkpoint",
            str(run),
            "--data-root",
            str(data),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--num-workers",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| category |" in printed and "**mean**" in printed

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["categories"]) == {"brick", "washer"}
    for values in [*metrics["categories"].values(), metrics["mean"]]:
        assert set(values) == set(METRIC_KEYS)
        assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in values.values())
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header == ["category", *METRIC_KEYS]
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert {"brick", "washer", "__all__"} <= set(thresholds["image"])
    assert math.isfinite(thresholds["image"]["__all__"]) and math.isfinite(thresholds["pixel"]["__all__"])
    # The thresholds also sit beside the checkpoint, where predict finds them.
    checkpoint = run / (run / "latest").read_text().strip()
    assert json.loads((checkpoint / "thresholds.json").read_text()) == thresholds
    curves = json.loads((out / "curves.json").read_text())
    assert {"image_roc", "pixel_pro"} <= set(curves["brick"])
    examples = json.loads((out / "examples.json").read_text())
    assert {e["rank"] for e in examples["brick"]} == {"most", "least"}

    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "brick" in html and "data:image" in html


def test_eval_protocols_and_errors(synth_root, tmp_path, capsys):
    run = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text("model: {preset: tiny}\n")
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--data-root",
                str(synth_root),
                "--out",
                str(run),
                "--max-steps",
                "1",
                "--device",
                "cpu",
                "--no-progress",
                *TINY,
            ]
        )
        == 0
    )
    code = main(
        [
            "eval",
            "--checkpoint",
            str(run),
            "--data-root",
            str(synth_root),
            "--out",
            str(tmp_path / "e"),
            "--protocol",
            "dinomaly",
            "--metrics",
            "streaming",
            "--categories",
            "brick",
            "--num-workers",
            "0",
            "--no-progress",
        ]
    )
    assert code == 0
    assert list(json.loads((tmp_path / "e" / "metrics.json").read_text())["categories"]) == ["brick"]
    capsys.readouterr()
    # Errors are one line and a non-zero exit code.
    assert main(["eval", "--checkpoint", str(tmp_path / "nope"), "--data-root", str(synth_root)]) != 0
    assert main(["train", "--config", str(config), "--set", "train.lrr=1", "--data-root", str(synth_root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "train.lrr" in err[-1]


def test_ablation_grid(synth_root, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("model: {preset: tiny}\ntrain: {max_steps: 1}\n")
    code = main(
        [
            "ablate",
            "--config",
            str(config),
            "--data-root",
            str(synth_root),
            "--out",
            str(tmp_path / "abl"),
            "--no-progress",
            "--seeds",
            "0",
            "1",
            *TINY,
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    for name in ("full (CNC)", "w/o cross-modal", "w/o CFD only", "w/o MoE", "w/o both", "with FNP"):
        assert name in table
    assert " ± " in table  # two seeds: mean ± std
    saved = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert saved["seeds"] == [0, 1] and len(saved["means"]) == 6
    assert all(set(runs) == {"0", "1"} for runs in saved["runs"].values())
    assert (tmp_path / "abl" / "no-cfd" / "seed1" / "eval").is_dir()
    assert (tmp_path / "abl" / "fnp" / "seed1" / "eval").is_dir()  # FNP: the full model's checkpoint, evaluated
