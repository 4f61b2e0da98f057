"""Bottleneck and decoder of the reverse-distillation model (METHOD.md §2; after ViTAD / Dinomaly).

The bottleneck fuses the tapped encoder levels into one token sequence of the decoder width; a stack of pre-LN ViT
blocks (timm's ``Block``) decodes it, and the outputs of chosen blocks, reversed, reconstruct the levels: the first
tapped decoder block matches the deepest encoder level. Per-level heads map the decoder width back to each level's
width (identity where they agree).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn


class Bottleneck(nn.Module):
    """Concatenate the levels along channels, then Linear -> LayerNorm -> Dropout.

    Args:
        level_dims: width C_l of each level.
        width: decoder width D.
        dropout: dropout probability.
    """

    def __init__(self, level_dims: Sequence[int], width: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.proj = nn.Linear(sum(level_dims), width)
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, levels: list[Tensor]) -> Tensor:
        x = torch.cat(levels, dim=-1)  # (B, L, ΣC_l)
        return self.dropout(self.norm(self.proj(x)))  # (B, L, D)


class Decoder(nn.Module):
    """Pre-LN ViT blocks; returns the outputs of ``taps`` reversed, each mapped to its level's width.

    Args:
        width: token width D.
        depth: number of blocks.
        heads: attention heads per block.
        taps: 0-based blocks whose outputs are read, one per level, increasing; the last is the last block.
        level_dims: width C_l of each encoder level (shallow to deep); a Linear head maps D -> C_l where they differ.
        mlp_ratio: block MLP hidden width as a multiple of D.
    """

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        taps: Sequence[int],
        level_dims: Sequence[int],
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if len(taps) != len(level_dims):
            raise ValueError(f"{len(taps)} decoder taps for {len(level_dims)} encoder levels; give one per level")
        if list(taps) != sorted(set(taps)) or taps[0] < 0 or taps[-1] != depth - 1:
            raise ValueError(
                f"decoder taps {list(taps)} must be increasing 0-based blocks of {depth}, the last one {depth - 1}"
            )
        self.taps = tuple(taps)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)])
        self.heads = nn.ModuleList([nn.Identity() if c == width else nn.Linear(width, c) for c in level_dims])

    def forward(self, x: Tensor) -> list[Tensor]:
        """Decode (B, L, D) tokens; return per level (B, L, C_l), shallow to deep."""
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.taps:
                outputs.append(x)
        outputs.reverse()  # last tapped block <-> shallowest encoder level
        return [head(out) for head, out in zip(self.heads, outputs)]
