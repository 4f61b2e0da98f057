"""The kept feature cache (``train.cache_dir``): reused across runs with the same encoder side and images only."""

import os

import pytest

from cnc_ad import feature_cache
from cnc_ad.checkpoint import load_model
from cnc_ad.config import load_config
from cnc_ad.errors import ConfigError
from cnc_ad.train import train


def tiny_config(root, *extra):
    return load_config(
        None,
        ["model.preset=tiny", f"data.root={root}", "data.num_workers=0", "train.epochs=1", "train.batch_size=4",
         *extra],
    )  # fmt: skip


def trainable(checkpoint):
    model = load_model(checkpoint, pretrained=False)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("encoder")}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key


def published(cache_dir):
    return sorted(p for p in cache_dir.iterdir() if (p / feature_cache.MANIFEST_FILE).is_file())


def test_a_kept_cache_is_reused_and_trains_the_same_model(synth_root, tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="cnc_ad")
    cache_dir = tmp_path / "features"
    plain = train(tiny_config(synth_root), tmp_path / "plain", progress=False, pretrained=False)
    first = train(tiny_config(synth_root, f"train.cache_dir={cache_dir}"), tmp_path / "a", progress=False,
                  pretrained=False)  # fmt: skip
    (kept,) = published(cache_dir)
    assert not list(cache_dir.glob("*.partial-*"))
    assert not (tmp_path / "a" / "feature_cache").exists()

    def no_encoding(*args, **kwargs):
        raise AssertionError("a kept cache with the same key must not encode the images again")

    monkeypatch.setattr(feature_cache, "make_loader", no_encoding)
    # a decoder-side change keeps the key
    second = train(tiny_config(synth_root, f"train.cache_dir={cache_dir}"), tmp_path / "b", progress=False,
                   pretrained=False)  # fmt: skip
    assert f"reusing {kept}" in caplog.text
    assert published(cache_dir) == [kept]  # still there after the second run
    assert_same(trainable(first.checkpoint), trainable(plain.checkpoint))
    assert_same(trainable(second.checkpoint), trainable(plain.checkpoint))
    train(tiny_config(synth_root, f"train.cache_dir={cache_dir}", "model.width=32"), tmp_path / "c",
          progress=False, pretrained=False)  # fmt: skip


def test_the_key_follows_the_encoder_side_and_the_images(synth_root, tmp_path):
    cache_dir = tmp_path / "features"
    train(tiny_config(synth_root, f"train.cache_dir={cache_dir}"), tmp_path / "a", progress=False, pretrained=False)
    train(tiny_config(synth_root, f"train.cache_dir={cache_dir}", "train.cache_dtype=float32"), tmp_path / "b",
          progress=False, pretrained=False)  # fmt: skip
    assert len(published(cache_dir)) == 2
    image = sorted((synth_root).rglob("train/good/*.png"))[0]
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a training image changed
    try:
        train(tiny_config(synth_root, f"train.cache_dir={cache_dir}"), tmp_path / "c", progress=False,
              pretrained=False)  # fmt: skip
    finally:
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert len(published(cache_dir)) == 3


def test_an_unfinished_kept_cache_is_not_read(synth_root, tmp_path):
    cache_dir = tmp_path / "features"
    train(tiny_config(synth_root, f"train.cache_dir={cache_dir}"), tmp_path / "a", progress=False, pretrained=False)
    (kept,) = published(cache_dir)
    (kept / feature_cache.MANIFEST_FILE).unlink()  # as if killed before the manifest was written
    assert feature_cache.FeatureCache.open_kept(kept) is None
    train(tiny_config(synth_root, f"train.cache_dir={cache_dir}"), tmp_path / "b", progress=False, pretrained=False)
    assert published(cache_dir) == [kept]  # replaced by a whole one


@pytest.mark.parametrize("extra", ["train.feature_cache=memory", "train.feature_cache=off",
                                   "train.cache_dtype=bfloat16"])  # fmt: skip
def test_a_kept_cache_needs_a_disk_cache(extra, tmp_path):
    with pytest.raises(ConfigError, match="cache_dir"):
        load_config(None, [f"train.cache_dir={tmp_path}", extra])
