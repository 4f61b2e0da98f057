import pytest

from cnc_ad.config import Config, config_from_dict, load_config, parse_overrides, save_config
from cnc_ad.errors import ConfigError


def test_defaults_follow_method():
    cfg = Config()
    assert cfg.train.lr == 1e-3 and cfg.train.batch_size == 8 and cfg.train.epochs == 250
    assert cfg.model.num_experts == 5 and cfg.model.top_k == 2
    assert (cfg.train.lambda_cfd, cfg.train.lambda_ngd, cfg.train.lambda_moe) == (1.0, 0.1, 0.01)


def test_overrides_parse_yaml_values():
    cfg = config_from_dict(parse_overrides(["train.lr=1e-4", "model.layers=[1, 2]", "train.max_steps=3"]))
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.layers == (1, 2)
    assert cfg.train.max_steps == 3


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lrr=1", "train.lrr"),
        ("nope.x=1", "nope"),
        ("train.batch_size=abc", "train.batch_size"),
        ("model.use_moe=3", "model.use_moe"),
        ("train.epochs=1.5", "train.epochs"),
        ("trainlr=1", "group.key=value"),
    ],
)
def test_bad_keys_and_types_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        config_from_dict(parse_overrides([override]))


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["model.preset=tiny", "train.epochs=3", "data.categories=[a, b]"])
    path = tmp_path / "c.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_words_stay_strings():
    cfg = config_from_dict(parse_overrides(["train.feature_cache=off", "model.use_moe=false"]))
    assert cfg.train.feature_cache == "off" and cfg.model.use_moe is False


@pytest.mark.parametrize(
    ("override", "choices"),
    [
        ("train.schedule=linear", "constant, cosine"),
        ("train.feature_cache=ram", "auto, memory, disk, off"),
        ("train.cache_dtype=int8", "float16, bfloat16, float32"),
        ("train.amp=fp16", "auto, bf16, off"),
        ("eval.protocol=mvtec", "ader, dinomaly"),
        ("eval.metrics=fast", "auto, exact, streaming"),
        ("model.score=mean", "max, top1, pool16"),
        ("data.format=coco", "mvtec, visa"),
        ("train.schedule=1", "constant, cosine"),
    ],
)
def test_choices_are_checked_when_the_config_loads(override, choices):
    with pytest.raises(ConfigError, match=rf"'{override.split('=')[0]}' must be one of {choices}"):
        load_config(None, [override])


def test_choices_accept_their_values_and_none():
    cfg = load_config(None, ["train.schedule=cosine", "data.format=visa-raw", "model.encoder=timm"])
    assert (cfg.train.schedule, cfg.data.format, cfg.model.encoder) == ("cosine", "visa-raw", "timm")
    assert load_config(None, ["data.format=null"]).data.format is None
