"""Bottleneck and decoder of the reverse-distillation model (docs/method.md, Model; after ViTAD / Dinomaly).

The bottleneck fuses the tapped encoder levels into one token sequence of the decoder width; a stack of pre-LN ViT
blocks (timm's ``Block``) decodes it, and the outputs of the chosen blocks (``decoder_layers``), reversed,
reconstruct the levels: the first of them matches the deepest encoder level. Per-level heads map the decoder width
back to each level's width (identity where they agree).

Attention is softmax attention (the paper's ViT decoder) or, as an option against over-generalisation, linear
attention (Dinomaly, CVPR 2025): its kernel ``elu + 1`` spreads every query over all tokens, so the decoder cannot
focus on one token and copy it, an anomalous one included; its cost is linear in the number of tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn


class LinearAttention(nn.Module):
    """Multi-head linear attention with the ``elu(x) + 1`` kernel (Katharopoulos et al. 2020; Dinomaly's decoder).

    ``out_i = φ(q_i) Σ_j φ(k_j) v_jᵀ / (φ(q_i) · Σ_j φ(k_j))``; same parameters (``qkv``, ``proj``) as timm's
    ``Attention``.

    Args:
        dim: token width D.
        num_heads: heads H (D divisible by H).
        qkv_bias: bias in the qkv projection.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("linear attention takes no attention mask")
        b, length, dim = x.shape
        qkv = self.qkv(x).reshape(b, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = F.elu(qkv[0]) + 1.0, F.elu(qkv[1]) + 1.0, qkv[2]  # (B, H, L, d), positive kernels
        kv = k.transpose(-2, -1) @ v  # (B, H, d, d)
        normaliser = q @ k.sum(dim=2, keepdim=True).transpose(-2, -1)  # (B, H, L, 1)
        out = (q @ kv) / (normaliser + 1e-6)  # (B, H, L, d)
        return self.proj(out.transpose(1, 2).reshape(b, length, dim))


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
    """Pre-LN ViT blocks; returns the outputs of ``decoder_layers`` reversed, each mapped to its level's width.

    Args:
        width: token width D.
        depth: number of blocks.
        heads: attention heads per block.
        decoder_layers: 0-based blocks whose outputs are read, one per level, increasing; the last is the last block.
        level_dims: width C_l of each encoder level (shallow to deep); a Linear head maps D -> C_l where they differ.
        mlp_ratio: block MLP hidden width as a multiple of D.
        attention: ``"softmax"`` (standard ViT blocks) or ``"linear"`` (:class:`LinearAttention` in every block).
    """

    def __init__(
        self,
        width: int,
        depth: int,
        heads: int,
        decoder_layers: Sequence[int],
        level_dims: Sequence[int],
        mlp_ratio: float = 4.0,
        attention: str = "softmax",
    ) -> None:
        super().__init__()
        if attention not in ("softmax", "linear"):
            raise ValueError(f"attention {attention!r} must be 'softmax' or 'linear'")
        if len(decoder_layers) != len(level_dims):
            raise ValueError(
                f"{len(decoder_layers)} decoder layers for {len(level_dims)} encoder levels; give one per level"
            )
        read = list(decoder_layers)
        if read != sorted(set(read)) or read[0] < 0 or read[-1] != depth - 1:
            raise ValueError(
                f"decoder layers {read} must be increasing 0-based blocks of {depth}, the last one {depth - 1}"
            )
        self.decoder_layers = tuple(read)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(depth)])
        if attention == "linear":
            for block in self.blocks:
                block.attn = LinearAttention(width, heads, qkv_bias=True)
        self.heads = nn.ModuleList([nn.Identity() if c == width else nn.Linear(width, c) for c in level_dims])

    def forward(self, x: Tensor) -> list[Tensor]:
        """Decode (B, L, D) tokens; return per level (B, L, C_l), shallow to deep."""
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.decoder_layers:
                outputs.append(x)
        outputs.reverse()  # last read block <-> shallowest encoder level
        return [head(out) for head, out in zip(self.heads, outputs, strict=True)]
