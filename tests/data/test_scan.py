"""Scanners on fake trees of every layout, every bad-input case, conversions and a fuzz test of random trees."""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnc_ad.data import (
    DatasetIndex,
    Sample,
    detect_format,
    export_meta,
    import_meta,
    load_mask,
    prepare_visa,
    scan_dataset,
    verify_index,
)
from cnc_ad.errors import DataError
from tests.helpers import write_image


def _mask(path: Path, size=(16, 16), value=255) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0]), np.uint8)
    array[4:8, 4:8] = value
    Image.fromarray(array).save(path)
    return path


def make_mvtec(root: Path, categories=("bottle", "cable"), train=3, good=2, defects=("crack",), per_defect=2) -> Path:
    for cat in categories:
        for i in range(train):
            write_image(root / cat / "train" / "good" / f"{i:03d}.png")
        for i in range(good):
            write_image(root / cat / "test" / "good" / f"{i:03d}.png")
        for defect in defects:
            for i in range(per_defect):
                write_image(root / cat / "test" / defect / f"{i:03d}.png")
                _mask(root / cat / "ground_truth" / defect / f"{i:03d}_mask.png")
    return root


def test_mvtec_layout(tmp_path):
    root = make_mvtec(tmp_path / "mvtec", defects=("crack", "hole"))
    (tmp_path / "mvtec" / "readme.txt").write_text("licence")
    write_image(tmp_path / "mvtec" / "bottle" / "train" / "good" / ".hidden.png")
    index = scan_dataset(root)
    assert index.format == "mvtec" and index.root == root
    assert index.categories == ["bottle", "cable"]
    assert index.counts() == {
        c: {"train_good": 3, "test_good": 2, "test_anomalous": 4, "masks": 4} for c in ("bottle", "cable")
    }
    assert len(index.train_samples()) == 6  # the unified multi-class training set
    assert {s.category for s in index.train_samples("cable")} == {"cable"}
    anomalous = [s for s in index.test_samples("bottle") if s.label == 1]
    assert all(s.mask is not None and s.mask.name == f"{s.image.stem}_mask.png" for s in anomalous)
    assert all(s.mask is None and s.defect == "good" for s in index.test_samples() if s.label == 0)
    assert scan_dataset(root, categories=["cable"]).categories == ["cable"]
    with pytest.raises(DataError, match="not found"):
        scan_dataset(root, categories=["nope"])
    single = scan_dataset(root / "bottle")  # one category folder works as a root too
    assert single.categories == ["bottle"]


def test_samples_are_frozen(tmp_path):
    sample = Sample(tmp_path / "a.png", "c", "train", 0, "good", None)
    with pytest.raises(AttributeError):
        sample.label = 1  # type: ignore[misc]
    assert DatasetIndex("mvtec", tmp_path, [sample]).counts()["c"]["train_good"] == 1


def test_defect_without_ground_truth_folder_is_allowed(tmp_path, caplog):
    root = make_mvtec(tmp_path / "d", categories=("c",))
    write_image(root / "c" / "test" / "scuff" / "000.png")
    with caplog.at_level(logging.WARNING):
        index = scan_dataset(root)
    scuff = [s for s in index.samples if s.defect == "scuff"]
    assert len(scuff) == 1 and scuff[0].mask is None and scuff[0].label == 1
    assert "scuff" in caplog.text


def test_image_without_mask(tmp_path, caplog):
    root = make_mvtec(tmp_path / "d", categories=("c",))
    (root / "c" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"001\.png has no mask.*skip_bad=True") as err:
        scan_dataset(root)
    assert "\n" not in str(err.value)
    with caplog.at_level(logging.WARNING):
        index = scan_dataset(root, skip_bad=True)
    assert index.counts()["c"]["test_anomalous"] == 1 and "001.png" in caplog.text


def test_mask_without_image(tmp_path):
    root = make_mvtec(tmp_path / "d", categories=("c",))
    _mask(root / "c" / "ground_truth" / "crack" / "009_mask.png")
    with pytest.raises(DataError, match=r"009_mask\.png has no image"):
        scan_dataset(root)
    assert scan_dataset(root, skip_bad=True).counts()["c"]["masks"] == 2
    (root / "c" / "ground_truth" / "crack" / "009_mask.png").unlink()
    _mask(root / "c" / "ground_truth" / "dent" / "000_mask.png")  # a defect type without its test folder
    with pytest.raises(DataError, match=r"dent.000_mask\.png has no image"):
        scan_dataset(root)


def test_mask_named_like_image_matches(tmp_path):
    root = make_mvtec(tmp_path / "d", categories=("c",))
    for mask in (root / "c" / "ground_truth" / "crack").iterdir():
        mask.rename(mask.with_name(mask.name.replace("_mask", "")))
    assert scan_dataset(root).counts()["c"]["masks"] == 2


def test_missing_root_empty_root_and_empty_category(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no dataset found"):
        scan_dataset(tmp_path / "empty")
    root = make_mvtec(tmp_path / "d", categories=("c",))
    (root / "hollow" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"'hollow'.*no images"):
        scan_dataset(root)
    assert scan_dataset(root, skip_bad=True).categories == ["c"]
    with pytest.raises(DataError, match="unknown dataset format"):
        scan_dataset(root, format="coco")


def test_verify_checks_decoding_and_mask_sizes(tmp_path, caplog):
    root = make_mvtec(tmp_path / "d", categories=("c",))
    assert len(verify_index(scan_dataset(root)).samples) == 7
    _mask(root / "c" / "ground_truth" / "crack" / "000_mask.png", size=(8, 8))
    (root / "c" / "train" / "good" / "001.png").write_bytes(b"")
    index = scan_dataset(root)  # headers are not read while scanning
    with pytest.raises(DataError, match="is empty") as err:
        verify_index(index)
    assert "\n" not in str(err.value)
    with caplog.at_level(logging.WARNING):
        kept = verify_index(index, skip_bad=True)
    assert len(kept.samples) == 5
    assert "is 8x8 but its image" in caplog.text


def test_symlink_loops_do_not_hang(tmp_path):
    root = make_mvtec(tmp_path / "d", categories=("c",))
    os.symlink(root, root / "c" / "train" / "good" / "loop")
    os.symlink("self", root / "c" / "test" / "self")  # a link to itself
    os.symlink(root / "c", root / "c" / "test" / "crack" / "up")
    index = scan_dataset(root)
    assert index.counts()["c"]["train_good"] == 3
    folder = tmp_path / "f"
    write_image(folder / "cat" / "good" / "a.png")
    os.symlink(folder, folder / "cat" / "good" / "again")
    assert scan_dataset(folder).counts()["cat"]["train_good"] == 1


def test_non_utf8_file_names(tmp_path):
    root = make_mvtec(tmp_path / "d", categories=("c",))
    name = os.fsencode(root / "c" / "train" / "good") + b"/bad\xff\xfe.png"
    with open(name, "wb") as handle:
        Image.new("RGB", (16, 16)).save(handle, format="PNG")
    index = scan_dataset(root)
    assert index.counts()["c"]["train_good"] == 4
    assert len(verify_index(index).samples) == 8
    assert "bad" in json.dumps(export_meta(index, tmp_path / "meta.json").read_text())


def _visa_raw(root: Path) -> Path:
    rows = []
    for cat in ("candle", "pcb1"):
        base = root / cat / "Data"
        for i in range(4):
            write_image(base / "Images" / "Normal" / f"{i:04d}.JPG")
            rows.append([cat, "train" if i < 3 else "test", "normal", f"{cat}/Data/Images/Normal/{i:04d}.JPG", ""])
        for i in range(2):
            write_image(base / "Images" / "Anomaly" / f"{i:03d}.JPG")
            _mask(base / "Masks" / "Anomaly" / f"{i:03d}.png", value=i + 1)  # VisA masks hold class indices
            rows.append(
                [
                    cat,
                    "test",
                    "anomaly",
                    f"{cat}/Data/Images/Anomaly/{i:03d}.JPG",
                    f"{cat}/Data/Masks/Anomaly/{i:03d}.png",
                ]
            )
    (root / "split_csv").mkdir()
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return root


def test_visa_raw_and_prepare_visa(tmp_path):
    root = _visa_raw(tmp_path / "visa")
    assert detect_format(root) == "visa-raw"
    index = scan_dataset(root)
    assert index.format == "visa-raw" and scan_dataset(root, format="visa").format == "visa-raw"
    assert index.counts()["pcb1"] == {"train_good": 3, "test_good": 1, "test_anomalous": 2, "masks": 2}
    converted = prepare_visa(root, tmp_path / "out")
    assert converted.format == "mvtec" and converted.counts() == index.counts()
    assert scan_dataset(tmp_path / "out", format="visa").format == "mvtec"
    mask_path = tmp_path / "out" / "pcb1" / "ground_truth" / "bad" / "000_mask.png"
    values = np.unique(np.asarray(Image.open(mask_path)))
    assert values.tolist() == [0, 255]
    assert load_mask(mask_path).sum() == 16
    with pytest.raises(DataError, match="not empty"):
        prepare_visa(root, tmp_path / "out")
    (root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DataError, match=r"1cls\.csv not found"):
        scan_dataset(root, format="visa-raw")


def test_mvtec_ad2(tmp_path):
    root = tmp_path / "ad2"
    cat = root / "can"
    for i in range(3):
        write_image(cat / "train" / "good" / f"{i:03d}_regular.png")
    write_image(cat / "validation" / "good" / "000_regular.png")
    write_image(cat / "test_public" / "good" / "000_regular.png")
    for i in range(2):
        write_image(cat / "test_public" / "bad" / f"{i:03d}_regular.png")
        _mask(cat / "test_public" / "ground_truth" / "bad" / f"{i:03d}_regular_mask.png")
    write_image(cat / "test_private" / "000_regular.png")
    index = scan_dataset(root)
    assert index.format == "mvtec-ad2"
    assert index.counts() == {"can": {"train_good": 3, "test_good": 1, "test_anomalous": 2, "masks": 2}}
    assert len(index.validation_samples("can")) == 1
    assert not [s for s in index.samples if "test_private" in str(s.image)]


@pytest.mark.parametrize("image_dir", ["realiad_1024", "."])
def test_realiad(tmp_path, image_dir):
    root = tmp_path / "real"
    base = root / image_dir / "toy"
    entries = {"train": [], "test": []}
    for i in range(3):
        write_image(base / "OK" / "S0001" / f"ok_{i}.jpg")
        entries["train" if i < 2 else "test"].append(
            {"category": "toy", "anomaly_class": "OK", "image_path": f"OK/S0001/ok_{i}.jpg", "mask_path": None}
        )
    write_image(base / "NG" / "AK" / "S0002" / "ng_0.jpg")
    _mask(base / "NG" / "AK" / "S0002" / "ng_0.png")
    entries["test"].append(
        {
            "category": "toy",
            "anomaly_class": "AK",
            "image_path": "NG/AK/S0002/ng_0.jpg",
            "mask_path": "NG/AK/S0002/ng_0.png",
        }
    )
    (root / "realiad_jsons").mkdir(parents=True)
    (root / "realiad_jsons" / "toy.json").write_text(json.dumps({"meta": {}, **entries}))
    index = scan_dataset(root)
    assert index.format == "realiad"
    assert index.counts() == {"toy": {"train_good": 2, "test_good": 1, "test_anomalous": 1, "masks": 1}}
    assert [s.defect for s in index.test_samples() if s.label] == ["AK"]


def test_folder_layout_per_category(tmp_path):
    root = tmp_path / "folders"
    for i in range(10):
        write_image(root / "widget" / "good" / f"g{i}.png")
    for i in range(2):
        write_image(root / "widget" / "bad" / "dent" / f"b{i}.png")
        _mask(root / "widget" / "masks" / f"b{i}_mask.png")
    for i in range(3):
        write_image(root / "plain" / f"{i}.png")  # images only: training images
    assert detect_format(root) == "folder"
    index = scan_dataset(root)
    assert index.counts() == {
        "plain": {"train_good": 3, "test_good": 0, "test_anomalous": 0, "masks": 0},
        "widget": {"train_good": 8, "test_good": 2, "test_anomalous": 2, "masks": 2},
    }
    assert {s.defect for s in index.test_samples("widget") if s.label} == {"dent"}


def test_folder_layout_explicit_dirs(tmp_path):
    for i in range(5):
        write_image(tmp_path / "ok" / f"{i}.png")
    write_image(tmp_path / "ng" / "x.png")
    _mask(tmp_path / "gt" / "x.png")
    index = scan_dataset(
        None, normal=tmp_path / "ok", abnormal=tmp_path / "ng", masks=tmp_path / "gt", categories=["part"]
    )
    assert index.format == "folder"
    assert index.counts() == {"part": {"train_good": 4, "test_good": 1, "test_anomalous": 1, "masks": 1}}
    _mask(tmp_path / "gt" / "y.png")
    with pytest.raises(DataError, match="has no image"):
        scan_dataset(None, normal=tmp_path / "ok", abnormal=tmp_path / "ng", masks=tmp_path / "gt")
    with pytest.raises(DataError, match="need normal=DIR"):
        scan_dataset(tmp_path, abnormal=tmp_path / "ng")


def test_meta_export_scan_and_import(tmp_path):
    root = make_mvtec(tmp_path / "d")
    index = scan_dataset(root)
    meta_path = export_meta(index)
    meta = json.loads(meta_path.read_text())
    item = next(i for i in meta["test"]["bottle"] if i["anomaly"])
    assert set(item) == {"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}
    assert item["img_path"].startswith("bottle/test/crack/") and item["mask_path"].endswith("_mask.png")
    assert detect_format(root) == "mvtec"  # the native layout wins over its meta.json
    again = scan_dataset(meta_path)
    assert again.format == "meta" and again.samples == index.samples
    assert scan_dataset(root, format="meta").samples == index.samples
    imported = import_meta(meta_path, tmp_path / "copy")
    assert imported.counts() == index.counts()
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match=r"cannot read meta\.json"):
        scan_dataset(tmp_path / "broken.json")


def test_synthetic_fixture_scans(synth_root):
    index = scan_dataset(synth_root)
    assert index.format == "mvtec" and len(index.categories) == 3
    assert all(row["masks"] == row["test_anomalous"] == 4 for row in index.counts().values())


# --- fuzz: random small trees never raise anything but DataError, and never hang --------------------------------

_PARTS = st.sampled_from(
    [
        "cat",
        "train",
        "good",
        "test",
        "bad",
        "ground_truth",
        "Data",
        "Images",
        "Normal",
        "test_public",
        "masks",
        "realiad_jsons",
        "split_csv",
    ]
)
_FILES = st.sampled_from(["000.png", "000_mask.png", "a.jpg", "meta.json", "1cls.csv", "cat.json", "x.txt"])
_CONTENT = st.sampled_from(["empty", "png", "text", "json"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    files=st.lists(st.tuples(st.lists(_PARTS, min_size=0, max_size=4), _FILES, _CONTENT), max_size=8),
    links=st.lists(st.tuples(st.lists(_PARTS, max_size=3), st.lists(_PARTS, max_size=2)), max_size=2),
    fmt=st.sampled_from([None, "mvtec", "visa", "visa-raw", "mvtec-ad2", "realiad", "folder", "meta"]),
)
def test_fuzz_random_trees(files, links, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for parts, name, content in files:
            path = root.joinpath(*parts, name)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except (FileExistsError, NotADirectoryError):
                continue
            if path.is_dir():
                continue
            if content == "png":
                Image.new("L", (4, 4), 255).save(path, format="PNG")
            elif content == "json":
                path.write_text('{"train": {"cat": [{"img_path": "000.png"}]}, "test": []}')
            else:
                path.write_text("" if content == "empty" else "object,split\nx,y\n")
        for source, target in links:
            link = root.joinpath(*source, "link")
            if link.parent.is_dir() and not link.exists() and not link.is_symlink():
                link.symlink_to(root.joinpath(*target))
        try:
            index = scan_dataset(root, format=fmt)
            verify_index(index, skip_bad=True)
        except DataError as err:
            assert "\n" not in str(err)
