"""Checkpoints: exact round trip, atomic run folders, checksums, no pickle, validated config."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from cnc_ad.checkpoint import (
    latest_checkpoint,
    load_model,
    load_trainable_state,
    load_trainer_state,
    read_checkpoint_meta,
    resolve_checkpoint,
    run_folder_of,
    save_checkpoint,
)
from cnc_ad.config import ModelConfig
from cnc_ad.errors import CheckpointError, ConfigError, WeightsError
from cnc_ad.model import build_model
from cnc_ad.thresholds import Thresholds, load_thresholds, save_thresholds


def _trained(preset: str = "tiny", steps: int = 2, **overrides):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=preset, **overrides), pretrained=False)
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    images = torch.rand(2, 3, model.image_size, model.image_size)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model.training_losses(model.encode(images))["loss"].backward()
        optimizer.step()
    model.store_text_features()  # as training does at its end
    return model.eval(), images


@pytest.mark.parametrize("preset", ["tiny", "cnc-effnet-lite0"])
def test_round_trip_gives_identical_predictions(tmp_path, preset):
    model, images = _trained(preset, fnp=True, abnormal_prompt=True)
    before = model.predict(images, map_size=32)
    folder = save_checkpoint(tmp_path / "run" / "epoch-0001", model, extra={"epoch": 1})
    meta = json.loads((folder / "model.json").read_text())
    assert meta["format"] == "cnc-ad-checkpoint" and meta["config"]["preset"] == preset
    assert meta["config"]["pretrained"] == "none" and meta["extra"] == {"epoch": 1}
    loaded = load_model(tmp_path / "run")  # the run folder's latest
    after = loaded.predict(images, map_size=32)
    assert torch.equal(before.score, after.score) and torch.equal(before.anomaly_map, after.anomaly_map)
    assert loaded.config == model.config and not loaded.training


def test_a_checkpoint_written_before_the_text_stored_flag_loads_and_predicts_identically(tmp_path):
    from safetensors.torch import load_file, save_file

    from cnc_ad.checkpoint import sha256_file

    model, images = _trained(fnp=True)
    before = model.predict(images, map_size=32)
    folder = save_checkpoint(tmp_path / "ck", model)
    tensors = load_file(str(folder / "model.safetensors"))
    assert bool(tensors.pop("text_stored"))  # what 0.1 wrote: the stored features without the flag
    save_file(tensors, str(folder / "model.safetensors"))
    meta = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**meta, "sha256": sha256_file(folder / "model.safetensors")}))
    loaded = load_model(folder)
    assert loaded.text_features_stored()
    after = loaded.predict(images, map_size=32)
    assert torch.equal(before.score, after.score) and torch.equal(before.anomaly_map, after.anomaly_map)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("normal_text_")}  # no features: still refused
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "model.json").write_text(json.dumps({**meta, "sha256": sha256_file(folder / "model.safetensors")}))
    with pytest.raises(CheckpointError, match="normal_text_0"):
        load_model(folder)


def test_checkpoint_holds_no_backbone(tmp_path):
    model, _ = _trained()
    folder = save_checkpoint(tmp_path / "ck", model)
    from safetensors.torch import load_file

    keys = load_file(str(folder / "model.safetensors")).keys()
    assert not any(k.startswith("encoder.") for k in keys)
    assert {"normal_text_0", "text_stored", "prompts.normal_context"} <= set(keys)


def test_run_folder_latest_previous_and_pruning(tmp_path):
    model, _ = _trained()
    run = tmp_path / "run"
    for epoch in range(1, 5):
        save_checkpoint(run / "checkpoints" / f"epoch-{epoch}", model, run_dir=run,
                        trainer_tensors={"step": torch.tensor([epoch])}, trainer_meta={"epoch": epoch})  # fmt: skip
    assert (run / "latest").read_text().strip() == "checkpoints/epoch-4"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-3", "epoch-4"]
    assert latest_checkpoint(run) == run / "checkpoints" / "epoch-4" == resolve_checkpoint(run)
    assert resolve_checkpoint(run / "last") == resolve_checkpoint(run / "latest") == latest_checkpoint(run)
    assert run_folder_of(latest_checkpoint(run)) == run
    tensors, meta = load_trainer_state(run)
    assert meta == {"epoch": 4} and tensors["step"].tolist() == [4]
    assert not list(run.glob("**/.*tmp*"))  # no temporary folders left


def test_resave_same_name_and_trainable_state(tmp_path):
    model, images = _trained()
    save_checkpoint(tmp_path / "ck", model)
    save_checkpoint(tmp_path / "ck", model)
    torch.manual_seed(99)
    other = build_model(ModelConfig(preset="tiny"), pretrained=False).eval()
    load_trainable_state(other, tmp_path / "ck")
    assert torch.equal(other.predict(images).anomaly_map, model.predict(images).anomaly_map)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_altered_or_truncated_checkpoint_is_refused(tmp_path, damage):
    model, _ = _trained()
    folder = save_checkpoint(tmp_path / "ck", model)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        weights.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    else:
        weights.unlink()
    with pytest.raises(CheckpointError, match=r"SHA-256|missing"):
        load_model(folder)


def test_trainer_state_checksum(tmp_path):
    model, _ = _trained()
    folder = save_checkpoint(tmp_path / "ck", model, trainer_tensors={"a": torch.ones(4)}, trainer_meta={"x": 1})
    (folder / "trainer.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_trainer_state(folder)
    bare = save_checkpoint(tmp_path / "bare", model)
    with pytest.raises(CheckpointError, match="no trainer state"):
        load_trainer_state(bare)


def test_pickle_checkpoint_refused(tmp_path):
    model, _ = _trained()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(path)
    raw = tmp_path / "model.weights"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="pickle"):
        resolve_checkpoint(raw)


def test_pickle_clip_weights_need_trust(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(WeightsError, match="trust_pickle=True"):
        build_model(ModelConfig(preset="cnc-vitb16-224"), clip_weights=str(path))
    with pytest.raises(WeightsError, match=r"not found.*clip_weights=PATH"):
        build_model(ModelConfig(preset="cnc-vitb16-224"), clip_weights=str(tmp_path / "missing.safetensors"))


def test_bad_config_in_checkpoint(tmp_path):
    model, _ = _trained()
    folder = save_checkpoint(tmp_path / "ck", model)
    meta = json.loads((folder / "model.json").read_text())
    meta["config"]["warp_drive"] = True
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="warp_drive"):
        load_model(folder)
    meta["config"].pop("warp_drive")
    meta["config"]["width"] = "wide"
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"model.width"):
        load_model(folder)
    (folder / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        read_checkpoint_meta(folder)


def test_missing_and_non_checkpoint_paths(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="neither"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint yet"):
        latest_checkpoint(tmp_path)


def test_thresholds_beside_checkpoint(tmp_path):
    model, _ = _trained()
    folder = save_checkpoint(tmp_path / "ck", model)
    assert load_thresholds(folder) is None
    save_thresholds(folder, Thresholds.from_json({"image": {"__all__": 0.5}, "pixel": {"__all__": 0.25}}))
    assert load_thresholds(folder).select("pixel") == 0.25
    load_model(folder)  # thresholds do not disturb the checksum


@pytest.mark.parametrize(("preset", "expected"), [("tiny", "clip"), ("cnc-effnet-lite0", "imagenet")])
def test_checkpoints_from_before_the_normalize_key_keep_their_arithmetic(tmp_path, preset, expected):
    # cnc-ad 0.1 wrote no model.normalize / model.token_stride: its timm encoders used ImageNet mean/std on the 1/16
    # grid whatever a preset says today.
    model, _ = _trained(preset)
    folder = save_checkpoint(tmp_path / "ck", model)
    meta = json.loads((folder / "model.json").read_text())
    del meta["config"]["normalize"], meta["config"]["token_stride"]
    (folder / "model.json").write_text(json.dumps(meta))
    loaded = load_model(folder)
    assert loaded.config.normalize == expected
    assert loaded.config.token_stride == (16 if preset == "cnc-effnet-lite0" else None)


def test_training_state_round_trip_restores_optimiser_and_generators(tmp_path):
    import random

    import numpy as np

    from cnc_ad.checkpoint import restore_training_state, training_state

    model, _ = _trained()
    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    model.training_losses(model.encode(torch.rand(2, 3, model.image_size, model.image_size)))["loss"].backward()
    optimizer.step()
    tensors, meta = training_state(optimizer, torch.device("cpu"))
    save_checkpoint(tmp_path / "ck", model, trainer_tensors=tensors, trainer_meta=meta)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    moments = {k: v.clone() for k, v in tensors.items() if k.startswith("optim.")}

    fresh = torch.optim.Adam(model.trainable_parameters(), lr=5.0)
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    loaded_tensors, loaded_meta = load_trainer_state(tmp_path / "ck")
    restore_training_state(fresh, torch.device("cpu"), loaded_tensors, loaded_meta)
    assert fresh.param_groups[0]["lr"] == 1e-2
    again, _ = training_state(fresh, torch.device("cpu"))
    assert all(torch.equal(again[k], v) for k, v in moments.items())
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
