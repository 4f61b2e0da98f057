"""Anomaly maps and image scores (docs/method.md, Inference; ADer protocol).

Per level the map is ``1 - cos(e, d)`` on the token grid, optionally weighted by feature-level normality promotion
(FNP); levels are averaged, upsampled bilinearly and smoothed by a Gaussian (σ = 4 by default, as a separable
convolution with a fixed kernel). Everything here has static shapes and no data-dependent Python control flow, so it
traces into ONNX.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCORES = ("max", "top1", "pool16")


def discrepancy(encoder: Tensor, decoder: Tensor) -> Tensor:
    """Per-token ``1 - cos`` of (B, L, C) encoder and decoder tokens -> (B, L)."""
    return 1.0 - F.cosine_similarity(encoder, decoder, dim=-1)


def fnp_weight(encoder_joint: Tensor, normal_text: Tensor, theta: float) -> Tensor:
    """Feature-level normality promotion coefficient ``1 + θ (1 - cos(ê_i, t)) / 2`` -> (B, L).

    Args:
        encoder_joint: (B, L, J) encoder tokens in the joint space.
        normal_text: (J,) normal text feature of the level.
        theta: ϑ.
    """
    cos = F.cosine_similarity(encoder_joint, normal_text.to(encoder_joint.dtype), dim=-1)  # (B, L)
    return 1.0 + theta * (1.0 - cos) / 2.0


def tokens_to_grid(values: Tensor, grid_size: int) -> Tensor:
    """(B, L) per-token values -> (B, 1, g, g) map."""
    return values.reshape(values.shape[0], 1, grid_size, grid_size)


class GaussianBlur(nn.Module):
    """Separable Gaussian blur of (B, 1, H, W) maps with reflected borders (like scipy's ``gaussian_filter``).

    The kernel is truncated at 4σ (scipy's default) and cropped to the map for maps smaller than the kernel.

    Args:
        sigma: standard deviation in pixels; 0 disables the blur.
    """

    kernel: Tensor  # (2r + 1,) a buffer

    def __init__(self, sigma: float = 4.0) -> None:
        super().__init__()
        self.sigma = float(sigma)
        self.radius = int(4.0 * sigma + 0.5) if sigma > 0 else 0
        offsets = torch.arange(-self.radius, self.radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (offsets / max(self.sigma, 1e-12)) ** 2)
        self.register_buffer("kernel", (kernel / kernel.sum()).float(), persistent=False)  # (2r + 1,)

    def forward(self, maps: Tensor) -> Tensor:
        if self.radius == 0:
            return maps
        height, width = maps.shape[-2:]
        radius = min(self.radius, height - 1, width - 1)  # reflect padding needs radius < size
        if radius <= 0:
            return maps
        kernel = self.kernel[self.radius - radius : self.radius + radius + 1]
        kernel = (kernel / kernel.sum()).to(maps.dtype)
        size = 2 * radius + 1
        x = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
        x = F.conv2d(x, kernel.view(1, 1, 1, size))  # along W
        return F.conv2d(x, kernel.view(1, 1, size, 1))  # along H


def image_score(maps: Tensor, method: str = "max") -> Tensor:
    """Image scores (B,) from smoothed maps (B, 1, H, W).

    Args:
        maps: anomaly maps.
        method: ``"max"`` (maximum), ``"top1"`` (mean of the top 1 % of pixels, Dinomaly) or ``"pool16"`` (maximum of
            the 16x16 sliding-window mean, ADer).
    """
    flat = maps.flatten(1)  # (B, H*W)
    if method == "max":
        return flat.amax(dim=1)
    if method == "top1":
        k = max(1, math.floor(flat.shape[1] * 0.01))
        return flat.topk(k, dim=1).values.mean(dim=1)
    if method == "pool16":
        size = min(16, maps.shape[-2], maps.shape[-1])
        return F.avg_pool2d(maps, size, stride=1).flatten(1).amax(dim=1)
    raise ValueError(f"unknown score {method!r}; choose one of {', '.join(SCORES)}")
