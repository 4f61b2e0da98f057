"""The offline demo end to end (small), and that running it again reuses the trained model."""

import json

from cnc_ad.demo import run_demo


def test_demo_runs_and_a_rerun_reuses_the_model(tmp_path):
    kwargs = {"categories": 2, "per_category": 8, "size": 64, "overrides": ("train.epochs=1",), "progress": False}
    first = run_demo(tmp_path, **kwargs)
    assert first.report.is_file() and "**mean**" in first.table
    metrics = json.loads((first.eval_dir / "metrics.json").read_text())
    assert set(metrics["categories"]) == {"brick", "washer"}
    log_lines = (first.run_dir / "log.jsonl").read_text()

    again = run_demo(tmp_path, **kwargs)
    assert (first.run_dir / "log.jsonl").read_text() == log_lines  # not trained again
    assert again.mean == first.mean

    changed = run_demo(tmp_path, **{**kwargs, "overrides": ("train.epochs=2",)})
    assert json.loads((changed.run_dir / "result.json").read_text())["epochs"] == 2
