"""Torch datasets and the loader: shapes and ranges, both protocols, bad files never raise inside workers."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cnc_ad.data import ImageFileDataset, TestDataset, TrainDataset, make_loader, scan_dataset
from cnc_ad.errors import DataError
from tests.helpers import write_image


def test_train_and_test_items(synth_root):
    index = scan_dataset(synth_root)
    train = TrainDataset(index.train_samples(), 32)
    item = train[0]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() >= 0 and item["image"].max() <= 1 and item["index"] == 0 and item["label"] == 0
    test = TestDataset(index.test_samples("brick"), 32, 64)
    labels = [test[i]["label"] for i in range(len(test))]
    assert labels.count(1) == 4
    for i in range(len(test)):
        mask = test[i]["mask"]
        assert mask.shape == (1, 64, 64) and mask.dtype == torch.float32
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert (mask.sum() > 0) == bool(test[i]["label"])


def test_dinomaly_protocol(synth_root):
    samples = scan_dataset(synth_root).test_samples("washer")
    item = TestDataset(samples, 28, 14, protocol="dinomaly")[len(samples) - 1]
    assert item["image"].shape == (3, 28, 28) and item["mask"].shape == (1, 14, 14)
    with pytest.raises(DataError, match="protocol"):
        TestDataset(samples, 28, 14, protocol="x")


def test_loader_batches_and_skip_bad(synth_root, tmp_path, caplog):
    root = tmp_path / "copy"
    shutil.copytree(synth_root / "brick", root / "brick")
    bad = sorted((root / "brick" / "train" / "good").iterdir())[1]
    bad.write_bytes(b"garbage")
    samples = scan_dataset(root).train_samples()
    dataset = TrainDataset(samples, 16)
    with pytest.raises(DataError, match="skip_bad=True") as err:
        list(make_loader(dataset, 4))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    loader = make_loader(dataset, 4, skip_bad=True)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            batches = list(loader)
    assert sum(len(b["index"]) for b in batches) == len(samples) - 1
    assert 1 not in torch.cat([b["index"] for b in batches]).tolist()
    assert caplog.text.count(str(bad)) == 1  # one warning per file, not per epoch


def test_loader_with_a_worker_process(synth_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synth_root / "grass", root / "grass")
    mask = sorted((root / "grass" / "ground_truth" / "stain").iterdir())[0]
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(mask)  # a mask of another size
    dataset = TestDataset(scan_dataset(root).test_samples(), 16, 16)
    with pytest.raises(DataError, match="is 5x5 but its image"):
        list(make_loader(dataset, 3, num_workers=1))
    batches = list(make_loader(dataset, 3, num_workers=1, skip_bad=True))
    assert sum(len(b["label"]) for b in batches) == len(dataset) - 1


def test_image_file_dataset(tmp_path):
    paths = [write_image(tmp_path / "a.png", size=(30, 20)), tmp_path / "missing.png"]
    dataset = ImageFileDataset(paths, 16)
    batch = next(iter(make_loader(dataset, 2, skip_bad=True)))
    assert batch["image"].shape == (1, 3, 16, 16)
    assert batch["path"] == [str(paths[0])] and batch["size"].tolist() == [[20, 30]]
