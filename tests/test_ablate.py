"""The ablation grid as a library: rows chosen by key, finished runs read back, interrupted ones resumed, runs of
another config refused."""

import dataclasses

import pytest

from cnc_ad.ablate import VARIANT_KEYS, VARIANTS, run_ablation
from cnc_ad.cli import main
from cnc_ad.config import config_from_dict, load_config
from cnc_ad.errors import ConfigError
from cnc_ad.runs import RunFolder


@pytest.fixture
def config(synth_root):
    return load_config(
        None,
        [
            "model.preset=tiny",
            f"data.root={synth_root}",
            "data.num_workers=0",
            "train.batch_size=4",
            "train.max_steps=1",
            "train.device=cpu",
        ],
    )


def test_finished_runs_are_read_back_not_trained_again(config, tmp_path):
    first = run_ablation(config, tmp_path, progress=False, variants=["full", "no-text"])
    assert first.trained == 2 and list(first.means) == ["full (CNC)", "w/o cross-modal"]
    assert (tmp_path / "full" / "eval" / "metrics.json").is_file()
    whole = run_ablation(config, tmp_path, progress=False)
    assert whole.trained == 3  # no-cfd, no-moe, plain; FNP evaluates the full model's checkpoint
    assert whole.means["full (CNC)"] == first.means["full (CNC)"]
    again = run_ablation(config, tmp_path, progress=False)
    assert again.trained == 0 and again.table == whole.table


def test_fnp_evaluates_the_full_models_checkpoint_and_leaves_its_thresholds(config, tmp_path):
    import json

    done = run_ablation(config, tmp_path, progress=False, seeds=[3], variants=["fnp"])
    assert done.trained == 1 and list(done.means) == ["with FNP"]  # the full model, trained for it
    full, fnp = tmp_path / "full" / "seed3", tmp_path / "fnp" / "seed3"
    assert not (fnp / "config.yaml").exists() and (fnp / "eval" / "metrics.json").is_file()
    checkpoint = RunFolder(full).final_checkpoint()
    assert json.loads((fnp / "eval" / "metrics.json").read_text())["checkpoint"] == str(checkpoint)
    # The thresholds beside the checkpoint are the full model's own evaluation's, not FNP's.
    beside = json.loads((checkpoint / "thresholds.json").read_text())
    assert beside == json.loads((full / "eval" / "thresholds.json").read_text())
    again = run_ablation(config, tmp_path, progress=False, seeds=[3], variants=["full", "fnp"])
    assert again.trained == 0 and again.means["with FNP"] == done.means["with FNP"]


def test_evaluation_changes_inference_keys_only(config, tmp_path):
    from cnc_ad.evaluate import evaluate_checkpoint

    run_ablation(config, tmp_path, progress=False, variants=["full"])
    checkpoint = RunFolder(tmp_path / "full").final_checkpoint()
    with pytest.raises(ConfigError, match=r"model\.width act in training"):
        evaluate_checkpoint(checkpoint, config, out_dir=tmp_path / "e", inference={"width": 8}, progress=False)


def test_an_interrupted_run_is_resumed_to_the_same_result(config, tmp_path):
    fresh = run_ablation(config, tmp_path / "fresh", progress=False, variants=["no-moe"])
    # Killed before its first checkpoint: only the run's config.yaml is there.
    variant = next(v for v in VARIANTS if v.key == "no-moe")
    RunFolder(tmp_path / "killed" / "no-moe").write_config(config_from_dict(variant.changes, config))
    resumed = run_ablation(config, tmp_path / "killed", progress=False, variants=["no-moe"])
    assert resumed.trained == 1
    assert resumed.means == fresh.means


def test_a_folder_of_another_config_is_refused(config, tmp_path):
    run_ablation(config, tmp_path, progress=False, variants=["full"])
    other = dataclasses.replace(config, train=dataclasses.replace(config.train, lr=0.5))
    with pytest.raises(ConfigError, match=r"another config \(differs in train\.lr\)"):
        run_ablation(other, tmp_path, progress=False, variants=["full"])


def test_unknown_variant_and_no_seed_are_refused(config, tmp_path):
    with pytest.raises(ConfigError, match="unknown ablation variant"):
        run_ablation(config, tmp_path, progress=False, variants=["full", "nope"])
    with pytest.raises(ConfigError, match="at least one seed"):
        run_ablation(config, tmp_path, progress=False, seeds=[])
    assert not any(tmp_path.iterdir())


def test_help_names_every_variant_key(capsys):
    with pytest.raises(SystemExit):
        main(["ablate", "--help"])
    text = capsys.readouterr().out
    assert all(f"  {key} " in text for key in VARIANT_KEYS)


def test_collect_trains_nothing_and_lists_what_is_missing(config, tmp_path):
    empty = run_ablation(config, tmp_path, progress=False, seeds=[0, 1], variants=["full", "fnp"], collect_only=True)
    assert empty.trained == 0 and empty.means == {} and len(empty.missing) == 4
    assert not (tmp_path / "full").exists()
    run_ablation(config, tmp_path, progress=False, seeds=[0], variants=["full"])  # one seed of one row
    some = run_ablation(config, tmp_path, progress=False, seeds=[0, 1], variants=["full", "fnp"], collect_only=True)
    assert some.trained == 0 and list(some.means) == ["full (CNC) (1 of 2 seeds)"]
    assert sorted(some.missing) == sorted(str(tmp_path / k / s) for k, s in [("full", "seed1"), ("fnp", "seed0"),
                                                                            ("fnp", "seed1")])  # fmt: skip
    assert "(1 of 2 seeds)" in some.table and "nan" not in some.table
