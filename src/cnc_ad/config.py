"""Configuration: frozen dataclasses grouped as ``model.*``, ``data.*``, ``train.*``, ``eval.*``.

Configs come from YAML files (``configs/*.yaml``) plus ``group.key=value`` overrides. Unknown keys, values of the wrong
type and choices outside a field's ``Literal[...]`` fail when the config is loaded, with a ConfigError naming the key.
Every choice that docs/method.md marks [ours] is a field here, so it can be changed and ablated without touching code.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cnc_ad.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """The detector. Fields left ``None`` take the preset's value (see ``cnc models``)."""

    preset: str = "cnc-vitl14-336"
    # Encoder (None = from the preset).
    encoder: Literal["clip", "timm"] | None = None
    backbone: str | None = None  # open_clip model name, or timm model name
    # CLIP: an open_clip tag ("openai") or a local file; timm: "efficientnet-lite0" (the packaged ImageNet weights),
    # "timm" (timm's own download) or a local .safetensors file; "none": random weights.
    pretrained: str | None = None
    image_size: int | None = None  # square input side in pixels
    layers: tuple[int, ...] | None = None  # 0-based encoder blocks (ViT) or stages (CNN) to tap
    # Bottleneck, gated MoE, decoder.
    width: int | None = None  # decoder width (None = encoder width; required for CNNs by the preset)
    decoder_depth: int | None = None  # number of decoder blocks
    decoder_heads: int | None = None
    decoder_layers: tuple[int, ...] | None = None  # 0-based decoder blocks whose outputs are read (reversed)
    mlp_ratio: float = 4.0
    bottleneck_dropout: float = 0.2
    use_moe: bool = True
    num_experts: int = 5
    top_k: int = 2
    expert_ratio: float = 4.0
    # Cross-modal normality constraint.
    use_text: bool = True  # False = no CFD/NGD terms (plain feature reconstruction when use_moe is False too)
    prompt_length: int = 12
    normal_template: str = "object."
    abnormal_prompt: bool = False
    abnormal_template: str = "damaged object."
    shared_context: bool = False  # one learnable context for all levels instead of one per level
    cfd_pool: Literal["mean", "softmax"] = "mean"
    cfd_tau: float = 0.001
    # Inference.
    score: Literal["max", "top1", "pool16"] = "max"  # top1: mean of the top 1 %; pool16: max of the 16x16-pooled map
    fnp: bool = False  # feature-level normality promotion
    fnp_theta: float = 5.0
    blur_sigma: float = 4.0
    map_size: int = 256  # side of the anomaly map returned by predict()
    # Encoder input and token grid (None = from the preset).
    normalize: Literal["clip", "imagenet", "inception"] | None = None  # the mean/std the weights were trained with
    token_stride: int | None = None  # CNN encoders: pixels per token side (16: 1/16 grid; 8: finer maps, 4x tokens)
    # Decoder attention: "softmax" (ViT blocks) | "linear" (Dinomaly's: cannot focus on one token, so cannot copy it).
    attention: Literal["softmax", "linear"] = "softmax"
    # A learned embedding of each token's grid position, added to the bottleneck's tokens. Without it the decoder is
    # blind to where a token lies; CNN tokens carry no position except the padding effects at the image border.
    position_embedding: bool = False
    # The encoder levels (0-based) whose maps are averaged into the anomaly map (None: all of them), and into the map
    # the image score is read from (None: the anomaly map's). Inference only: both can change on a trained model.
    map_levels: tuple[int, ...] | None = None
    score_levels: tuple[int, ...] | None = None


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how to read them."""

    root: str | None = None
    format: Literal["mvtec", "visa", "visa-raw", "mvtec-ad2", "realiad", "folder", "meta"] | None = None  # None: detect
    categories: tuple[str, ...] | None = None  # None = every category found
    skip_bad: bool = False  # log and skip undecodable files instead of stopping
    num_workers: int = 2
    # Good training images kept aside to set thresholds on after training (cnc_ad.data.samples.split_calibration):
    # this share of each category, at least calibration_min, none for categories under 2 x calibration_min. 0 = none.
    calibration_share: float = 0.1
    calibration_min: int = 5

    def __post_init__(self) -> None:
        if not 0.0 <= self.calibration_share <= 0.5:
            raise ConfigError(f"data.calibration_share={self.calibration_share!r}: use a share in [0, 0.5] (0: none)")
        if self.calibration_min < 1:
            raise ConfigError(f"data.calibration_min={self.calibration_min!r}: use at least 1")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation (docs/method.md, Training objective)."""

    epochs: int = 250
    max_steps: int | None = None  # stop after this many optimiser steps when set
    batch_size: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = None  # max global gradient norm
    lambda_cfd: float = 1.0
    lambda_ngd: float = 0.1
    lambda_moe: float = 0.01
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    amp: Literal["auto", "bf16", "off"] = "auto"  # auto: bf16 on CUDA
    feature_cache: Literal["auto", "memory", "disk", "off"] = "auto"
    # Precision of the encoder features, with and without the cache (a disk cache needs float16 or float32).
    cache_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    cache_memory_gb: float = 8.0  # "auto" keeps the cache in memory up to this size, else a disk memmap
    # Keep the (disk) feature cache in this folder after training, keyed by the encoder side and the training images,
    # and reuse it in later runs with the same key: decoder-side studies encode the images once. None: the cache
    # lives in the run folder and is deleted when training ends.
    cache_dir: str | None = None
    log_every: int = 10  # steps between log.jsonl lines
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch is always saved)
    # Loose reconstruction (Dinomaly's hard-mined cosine loss): the tokens reconstructed best, a share ramped linearly
    # from 0 to hard_mining over hard_mining_steps, get their gradient scaled by hard_mining_factor. 0 = off.
    hard_mining: float = 0.0
    hard_mining_steps: int = 1000
    hard_mining_factor: float = 0.1
    # How each epoch draws its training images across categories: 0 = every image once (categories in proportion to
    # their image counts); b > 0 = each epoch draws as many images with replacement, category c with probability
    # proportional to n_c ** (1 - b), so 1 gives every category the same share (a product type with 30 images is seen
    # as often as one with 3,000).
    category_balance: float = 0.0
    # Normality-guided decoding: "pull" (the paper's form: every decoded token toward the normality feature) or
    # "hinge" (only where the decoded token is farther from normality than its encoder token: a perfect
    # reconstruction of a normal token costs nothing).
    ngd: Literal["pull", "hinge"] = "pull"
    # The share of good images the thresholds set after training (on the held-out images) call anomalous.
    false_alarm_rate: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 < self.false_alarm_rate < 0.5:
            raise ConfigError(f"train.false_alarm_rate={self.false_alarm_rate!r}: use a share in (0, 0.5), e.g. 0.01")
        if not 0.0 <= self.category_balance <= 1.0:
            raise ConfigError(
                f"train.category_balance={self.category_balance!r}: use a value in [0, 1] (0: every image once an "
                "epoch; 1: every category equally often)"
            )
        if not 0.0 <= self.hard_mining < 1.0:
            raise ConfigError(f"train.hard_mining={self.hard_mining!r}: use a share in [0, 1), e.g. 0.9 (0 = off)")
        if self.cache_dir is not None and self.feature_cache not in ("auto", "disk"):
            raise ConfigError(
                f"train.cache_dir keeps a disk feature cache, but train.feature_cache={self.feature_cache!r}: "
                "use auto or disk, or leave train.cache_dir unset"
            )
        if self.cache_dir is not None and self.cache_dtype == "bfloat16":
            raise ConfigError("train.cache_dir keeps a disk feature cache, which needs cache_dtype float16 or float32")


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation protocol (docs/method.md, Evaluation)."""

    protocol: Literal["ader", "dinomaly"] = "ader"  # ader: 256 maps, masks > 0.5, sigma 4; dinomaly: 448/392, top-1 %
    batch_size: int = 16
    metrics: Literal["auto", "exact", "streaming"] = "auto"
    streaming_bins: int = 10_000
    streaming_above_pixels: int = 500_000_000  # "auto" switches to streaming above this many pixels per category


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false are booleans, so ``feature_cache: off`` stays the string "off"."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


GROUPS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    return value


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's type hint and convert lists to tuples; raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if isinstance(value, str) and value in choices:
            return value
        raise ConfigError(f"config key {key!r} must be one of {', '.join(choices)}; got {value!r}")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"config key {key!r}: got {value!r}")
    if origin is tuple:
        args = typing.get_args(annotation)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool) and args and args[-1] is Ellipsis:
            value = [value]
        if not isinstance(value, Sequence) or isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        if args and args[-1] is Ellipsis:
            return tuple(_coerce(key, v, args[0]) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"config key {key!r} must have {len(args)} values, got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args, strict=True))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    raise ConfigError(f"config key {key!r}: unsupported type {annotation!r}")  # pragma: no cover


def _build_group(name: str, values: Mapping[str, Any], base: Any) -> Any:
    cls = GROUPS[name]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    updates = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{name}.{key}'; known keys of '{name}': {', '.join(sorted(known))}")
        updates[key] = _coerce(f"{name}.{key}", value, hints[key])
    return dataclasses.replace(base, **updates)


def config_from_dict(values: Mapping[str, Any], base: Config | None = None) -> Config:
    """Build a Config from a nested mapping ``{"model": {...}, "train": {...}}``; unknown keys raise ConfigError."""
    base = base or Config()
    if not isinstance(values, Mapping):
        raise ConfigError(f"a config must be a mapping of groups ({', '.join(GROUPS)}), got {type(values).__name__}")
    groups = {}
    for name, group in values.items():
        if name not in GROUPS:
            raise ConfigError(f"unknown config group '{name}'; known groups: {', '.join(GROUPS)}")
        if group is None:
            continue
        if not isinstance(group, Mapping):
            raise ConfigError(f"config group '{name}' must be a mapping of keys, got {group!r}")
        groups[name] = _build_group(name, group, getattr(base, name))
    return dataclasses.replace(base, **groups)


def parse_overrides(overrides: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Turn ``["train.lr=1e-4", "model.layers=[1,2]"]`` into a nested mapping; values are parsed as YAML."""
    nested: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like group.key=value, e.g. train.lr=1e-4")
        group, _, name = key.strip().partition(".")
        try:
            value = _load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
        nested.setdefault(group, {})[name] = value
    return nested


# The presets ship inside the package (the repository's top-level configs/ links here).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def find_config(name: str | Path) -> Path:
    """A config file: a path, or the name of a preset in the repository's ``configs/`` (``demo`` -> demo.yaml)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / str(name)):
        if candidate.is_file():
            return candidate
    available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))) or "none found"
    raise ConfigError(f"config file {name} not found; pass a YAML file or a preset name ({available})")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply ``group.key=value`` overrides."""
    config = Config()
    if path is not None:
        path = find_config(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass one of configs/*.yaml or a file of your own")
        try:
            values = _load_yaml(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
        config = config_from_dict(values, config)
    if overrides:
        config = config_from_dict(parse_overrides(overrides), config)
    return config


def save_config(config: Config, path: str | Path) -> None:
    from cnc_ad.files import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
