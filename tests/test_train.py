"""The training loop: feature-cache equivalence, resume equivalence, non-finite losses, run folder contents."""

import itertools
import json

import numpy as np
import pytest
import torch

from cnc_ad import train as train_module
from cnc_ad.checkpoint import latest_checkpoint, load_model
from cnc_ad.config import load_config
from cnc_ad.errors import ConfigError, TrainingError
from cnc_ad.train import learning_rate, train, training_samples


def tiny_config(root, *extra):
    return load_config(
        None,
        [
            "model.preset=tiny",
            f"data.root={root}",
            "data.num_workers=0",
            "train.epochs=3",
            "train.batch_size=4",
            "train.log_every=1",
            "train.schedule=cosine",
            "train.warmup_steps=2",
            *extra,
        ],
    )


def trainable(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("encoder")}


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def test_feature_cache_gives_the_same_model(synth_root, tmp_path):
    cached = train(
        tiny_config(synth_root, "train.feature_cache=memory"), tmp_path / "a", progress=False, pretrained=False
    )
    fresh = train(tiny_config(synth_root, "train.feature_cache=off"), tmp_path / "b", progress=False, pretrained=False)
    a = trainable(load_model(cached.checkpoint, pretrained=False))
    b = trainable(load_model(fresh.checkpoint, pretrained=False))
    assert_same_weights(a, b, atol=1e-6)


def test_disk_cache_gives_the_same_model(synth_root, tmp_path, caplog):
    caplog.set_level("INFO", logger="cnc_ad")
    memory = train(tiny_config(synth_root, "train.feature_cache=memory", "train.epochs=1"), tmp_path / "a",
                   progress=False, pretrained=False)  # fmt: skip
    disk = train(tiny_config(synth_root, "train.feature_cache=disk", "train.epochs=1"), tmp_path / "b",
                 progress=False, pretrained=False)  # fmt: skip
    assert "feature cache: disk" in caplog.text
    assert not (tmp_path / "b" / "feature_cache").exists()  # removed once training ends
    assert_same_weights(trainable(load_model(memory.checkpoint, pretrained=False)),
                        trainable(load_model(disk.checkpoint, pretrained=False)))  # fmt: skip


def test_resume_reaches_the_same_weights(synth_root, tmp_path, monkeypatch):
    config = tiny_config(synth_root)
    full = train(config, tmp_path / "full", progress=False, pretrained=False)

    # Interrupt the second run right after its first checkpoint, as a crash would.
    original = train_module.save_training_checkpoint
    calls = {"n": 0}

    def crash_after_first_save(*args, **kwargs):
        path = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train_module, "save_training_checkpoint", crash_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "resumed", progress=False, pretrained=False)
    monkeypatch.setattr(train_module, "save_training_checkpoint", original)
    resumed = train(config, tmp_path / "resumed", resume=True, progress=False, pretrained=False)
    assert resumed.steps == full.steps

    # The log holds each step once, as an uninterrupted run's does.
    def steps(run):
        return [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]

    assert steps(tmp_path / "resumed") == steps(tmp_path / "full")
    assert_same_weights(
        trainable(load_model(full.checkpoint, pretrained=False)),
        trainable(load_model(resumed.checkpoint, pretrained=False)),
    )


def test_run_folder_holds_config_log_and_checkpoint(synth_root, tmp_path):
    result = train(tiny_config(synth_root, "train.max_steps=3"), tmp_path / "run", progress=False, pretrained=False)
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert {"loss", "rec", "lr"} <= lines[0].keys()
    assert result.steps == 3
    assert latest_checkpoint(run) == result.checkpoint


def test_training_stores_the_trained_text_features_and_the_model_predicts(synth_root, tmp_path):
    config = tiny_config(synth_root, "model.fnp=true", "model.abnormal_prompt=true", "train.checkpoint_every=1")
    result = train(config, tmp_path / "run", progress=False, pretrained=False)
    model = load_model(result.checkpoint, pretrained=False)
    assert model.text_features_stored()
    live, stored = model.text_features(), model.stored_text_features()  # from the final prompts, not an earlier epoch
    assert stored.abnormal is not None and live.abnormal is not None
    for a, b in zip([*live.normal, *live.abnormal], [*stored.normal, *stored.abnormal], strict=True):
        torch.testing.assert_close(a, b)
    prediction = model.predict(torch.rand(2, 3, model.image_size, model.image_size))
    assert torch.isfinite(prediction.anomaly_map).all()


def test_non_finite_loss_stops_with_step_and_term(synth_root, tmp_path, monkeypatch):
    from cnc_ad.model import CNC

    original = CNC.training_losses
    state = {"step": 0}

    def poisoned(self, *args, **kwargs):
        losses = original(self, *args, **kwargs)
        state["step"] += 1
        if state["step"] == 5:
            losses["rec"] = losses["rec"] * float("nan")
            losses["loss"] = losses["loss"] + losses["rec"]
        return losses

    monkeypatch.setattr(CNC, "training_losses", poisoned)
    with pytest.raises(TrainingError, match=r"step 5 .*rec=nan"):
        train(tiny_config(synth_root), tmp_path / "run", progress=False, pretrained=False)
    # The checkpoint of the first epoch (before the bad step) is still there and loads.
    load_model(latest_checkpoint(tmp_path / "run"), pretrained=False)


def test_learning_rate_schedule():
    cfg = tiny_config("x", "train.lr=1.0", "train.min_lr_ratio=0.1").train
    rates = [learning_rate(step, 12, cfg) for step in range(12)]
    assert rates[0] == pytest.approx(0.5) and rates[1] == pytest.approx(1.0)
    assert rates[-1] == pytest.approx(0.1, abs=0.05)
    assert all(a >= b for a, b in itertools.pairwise(rates[1:]))


def test_skip_bad_reaches_the_scanner(synth_root, tmp_path):
    import shutil

    from cnc_ad.errors import DataError

    root = tmp_path / "data"
    shutil.copytree(synth_root, root)
    next((root / "brick" / "ground_truth").rglob("*_mask.png")).unlink()  # a test image without its mask
    with pytest.raises(DataError, match="skip_bad=True"):
        train(tiny_config(root), tmp_path / "a", progress=False, pretrained=False)
    samples = training_samples(tiny_config(root, "data.skip_bad=true"))
    assert len(samples) == 18
    assert not (tmp_path / "a").exists()  # nothing written before the data was found usable


def test_too_few_images_for_the_batch_is_a_clear_error(synth_root, tmp_path):
    from cnc_ad.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        train(tiny_config(synth_root, "train.batch_size=64"), tmp_path / "a", progress=False, pretrained=False)
    assert not (tmp_path / "a").exists()


def test_torchrun_needs_one_run_folder(synth_root, monkeypatch, capsys):
    from cnc_ad.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--config", "demo", "--data-root", str(synth_root)]) == 2
    assert "--out" in capsys.readouterr().err


def test_devices_are_checked():
    from cnc_ad.device import resolve_device
    from cnc_ad.errors import ConfigError

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


def test_an_existing_run_is_not_overwritten(synth_root, tmp_path):
    from cnc_ad.errors import ConfigError

    config = tiny_config(synth_root, "train.max_steps=1")
    train(config, tmp_path / "run", progress=False, pretrained=False)
    with pytest.raises(ConfigError, match="resume=True"):
        train(config, tmp_path / "run", progress=False, pretrained=False)
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps"] == 1


def test_epoch_order_balances_categories_when_asked():
    from cnc_ad.config import TrainConfig
    from cnc_ad.train import epoch_order

    categories = np.array([0] * 900 + [1] * 90 + [2] * 10)  # 1000 rows, one category with 10 images
    plain = epoch_order(categories, 0, TrainConfig(batch_size=8))
    assert sorted(plain.tolist()) == list(range(1000))  # without balance: every row once
    shares = {}
    for balance in (0.5, 1.0):
        order = epoch_order(categories, 0, TrainConfig(batch_size=8, category_balance=balance))
        assert len(order) == 1000  # an epoch is as long as before
        assert np.array_equal(order, epoch_order(categories, 0, TrainConfig(batch_size=8, category_balance=balance)))
        counts = np.bincount(categories[order], minlength=3) / len(order)
        expected = np.array([900, 90, 10], float) ** (1 - balance)
        np.testing.assert_allclose(counts, expected / expected.sum(), atol=0.04)
        shares[balance] = counts[2]
    assert shares[1.0] > shares[0.5] > 0.05  # the small category is drawn far more often than its 1 % of images
    valid = np.ones(1000, bool)
    valid[990:] = False  # the small category's images were unreadable: never drawn
    order = epoch_order(categories, 1, TrainConfig(batch_size=8, category_balance=1.0), valid)
    assert not np.isin(order, np.arange(990, 1000)).any() and len(order) == 984
    with pytest.raises(ConfigError, match="category_balance"):
        load_config(None, ["train.category_balance=1.5"])
