"""The run folder: paths, config, log trimming on resume, result, latest, pruning."""

from __future__ import annotations

from pathlib import Path

from cnc_ad.config import load_config
from cnc_ad.runs import RunFolder, is_last_alias, is_latest_file, prune_checkpoints, run_folder_of


def test_paths_config_and_result(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    assert not run.is_run() and not run.has_checkpoint() and run.final_checkpoint() is None
    assert run.checkpoint_dir(3) == tmp_path / "run" / "checkpoints" / "epoch-0003"
    config = load_config("demo", ["train.epochs=2"])
    run.write_config(config)
    assert run.is_run() and run.read_config() == config
    assert run.read_config(["train.epochs=5"]).train.epochs == 5
    run.write_result(run.checkpoint_dir(2), epochs=2, steps=10, last_loss={"loss": 0.5})
    assert run.final_checkpoint() == run.checkpoint_dir(2)
    assert run.read_result() == {"checkpoint": "checkpoints/epoch-0002", "epochs": 2, "steps": 10,
                                 "last_loss": {"loss": 0.5}}  # fmt: skip
    run.result_path.write_text("{cut short")
    assert run.read_result() is None and run.final_checkpoint() is None


def test_log_is_trimmed_to_the_checkpoint_a_run_resumes_from(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    run.start_log()
    for step in range(1, 6):
        run.append_log({"step": step, "loss": 1.0 / step})
    assert [r["step"] for r in run.read_log()] == [1, 2, 3, 4, 5]
    run.start_log(through_step=3)  # resuming from the checkpoint at step 3
    assert [r["step"] for r in run.read_log()] == [1, 2, 3]
    run.start_log()  # a new run
    assert run.read_log() == []


def test_latest_alias_and_run_folder_of(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    checkpoint = run.checkpoint_dir(1)
    checkpoint.mkdir(parents=True)
    assert run.read_latest() is None and not is_last_alias(run.path / "last")
    run.point_latest(checkpoint)
    assert run.latest_path.read_text().strip() == "checkpoints/epoch-0001"
    assert run.read_latest() == checkpoint and run.has_checkpoint()
    assert is_latest_file(run.latest_path) and is_last_alias(run.path / "last")
    assert run_folder_of(checkpoint) == run.path
    assert run_folder_of(tmp_path / "loose" / "ck") == tmp_path / "loose"  # no run folder: the parent


def test_pruning_keeps_newest_previous_and_foreign_folders(tmp_path: Path) -> None:
    parent = tmp_path / "checkpoints"
    for name in ("epoch-1", "epoch-2", "epoch-3", "notes", ".tmp"):
        (parent / name).mkdir(parents=True)
    ours = {"epoch-1", "epoch-2", "epoch-3", ".tmp"}
    prune_checkpoints(parent, 2, newest=parent / "epoch-3", previous=parent / "epoch-1",
                      is_checkpoint=lambda p: p.name in ours)  # fmt: skip
    assert sorted(p.name for p in parent.iterdir()) == [".tmp", "epoch-1", "epoch-3", "notes"]


def test_resuming_a_run_whose_log_ends_in_a_torn_line(tmp_path: Path) -> None:
    run = RunFolder(tmp_path / "run")
    run.start_log()
    for step in (1, 2, 3):
        run.append_log({"step": step, "note": "é"})
    with run.log_path.open("ab") as handle:
        handle.write('{"step": 4, "note": "é'.encode()[:-1])  # a power loss inside the two bytes of "é"
    assert [r["step"] for r in run.read_log()] == [1, 2, 3]
    run.start_log(through_step=3)  # what `cnc train --resume` does
    run.append_log({"step": 4})
    assert [r["step"] for r in run.read_log()] == [1, 2, 3, 4]
