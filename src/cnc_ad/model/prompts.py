"""Class-agnostic learnable prompts: the normality features t_l of CNC (docs/method.md, Model; after CoOp /
AnomalyCLIP).

With a CLIP encoder, the prompt ``[V1..Vn] object.`` has learnable context vectors in the token-embedding space and
runs through the frozen text tower (:func:`encode_text_embeddings`, the same computation as open_clip's
``encode_text`` but starting from embeddings). There is one context set per tapped level, or one shared set. An
optional abnormal prompt ``[W1..Wn] damaged object.`` has its own context.

With an encoder that has no text tower (timm CNNs), the normality feature of each level is a learnable vector in that
level's feature space (:class:`NormalityVectors`).

Both return :class:`TextFeatures`: per level an L2-normalised vector (J_l,).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

OpenCLIP = Any
"""An open_clip ``CLIP`` model (an ``nn.Module``; open_clip has no type information, so its attributes are untyped)."""


class TextFeatures(NamedTuple):
    """Per level L2-normalised normality features; ``abnormal`` is None without an abnormal prompt."""

    normal: list[Tensor]  # per level (J_l,)
    abnormal: list[Tensor] | None


def encode_text_embeddings(clip: OpenCLIP, embeddings: Tensor, tokens: Tensor) -> Tensor:
    """Run an open_clip CLIP text tower from token embeddings instead of token ids.

    Args:
        clip: open_clip ``CLIP`` (uses ``positional_embedding``, ``transformer``, ``attn_mask``, ``ln_final``,
            ``text_pool_type``, ``text_projection``).
        embeddings: (N, T, W) token embeddings, some of them learned; T may be shorter than the context length (the
            first T positions, see :func:`text_prefix_length`).
        tokens: (N, T) the token ids the embeddings stand for; they locate the end-of-text token for pooling.

    Returns:
        (N, E) L2-normalised text features, equal to ``clip.encode_text(tokens, normalize=True)`` when
        ``embeddings = clip.token_embedding(tokens)``.
    """
    length = embeddings.shape[1]
    x = embeddings + clip.positional_embedding[:length].to(embeddings.dtype)  # (N, T, W)
    mask = clip.attn_mask[:length, :length] if clip.attn_mask is not None else None
    x = clip.transformer(x, attn_mask=mask)
    x = clip.ln_final(x)
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))  # (N, W)
    projection = clip.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, nn.Linear) else x @ projection  # (N, E)
    return F.normalize(x, dim=-1)


def text_prefix_length(clip: OpenCLIP, tokens: Tensor) -> int:
    """How many leading positions of ``tokens`` (N, T) the text tower needs to run.

    With causal attention and pooling at the end-of-text token (``text_pool_type="argmax"``, OpenAI CLIP), the pooled
    token sees only the tokens before it, so the padding after the last end-of-text token can be dropped without
    changing the features: the default prompt (12 context words, "object.") runs 16 of 77 positions. Otherwise all T.
    """
    mask = getattr(clip, "attn_mask", None)
    length = tokens.shape[1]
    if mask is None or getattr(clip, "text_pool_type", None) != "argmax":
        return length
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).triu(1)
    if mask.shape != (length, length) or not torch.equal(torch.isneginf(mask), causal):
        return length
    return int(tokens.argmax(dim=-1).max()) + 1


def _prompt_tokens(clip: OpenCLIP, tokenizer: Callable[[list[str]], Tensor], text: str) -> Tensor:
    """Token ids (1, T) of ``text`` up to :func:`text_prefix_length`, in their own storage with plain strides (a
    sliced view would keep the tokenizer's (1, 77) storage and strides, which DDP's buffer broadcast refuses).
    """
    tokens = tokenizer([text])
    return tokens[:, : text_prefix_length(clip, tokens)].clone(memory_format=torch.contiguous_format)


class PromptLearner(nn.Module):
    """Learnable context vectors for the normal (and optionally abnormal) prompt on a frozen CLIP text tower.

    The text tower is not a submodule here (it is frozen and belongs to the encoder); it is passed to ``forward``.

    Args:
        text_model: the frozen open_clip CLIP whose text tower will run the prompts (read for sizes only).
        tokenizer: open_clip tokenizer: ``tokenizer(list[str]) -> (N, T)`` token ids.
        num_levels: number of tapped encoder levels.
        prompt_length: number of learnable context vectors n.
        normal_template: words after the context of the normal prompt.
        abnormal: also learn an abnormal prompt.
        abnormal_template: words after the context of the abnormal prompt.
        shared_context: one context set for all levels instead of one per level.
    """

    normal_tokens: Tensor  # (1, T) token ids, a buffer
    abnormal_tokens: Tensor | None
    abnormal_context: nn.Parameter | None

    def __init__(
        self,
        text_model: OpenCLIP,
        tokenizer: Callable[[list[str]], Tensor],
        num_levels: int,
        prompt_length: int = 12,
        normal_template: str = "object.",
        abnormal: bool = False,
        abnormal_template: str = "damaged object.",
        shared_context: bool = False,
    ) -> None:
        super().__init__()
        self.num_levels = num_levels
        self.prompt_length = prompt_length
        width = text_model.token_embedding.weight.shape[1]
        sets = 1 if shared_context else num_levels
        placeholder = " ".join(["X"] * prompt_length)
        # Token ids (1, T), cut after the end-of-text token where that gives the same features (text_prefix_length).
        normal_tokens = _prompt_tokens(text_model, tokenizer, f"{placeholder} {normal_template}")
        self.register_buffer("normal_tokens", normal_tokens, persistent=False)
        self.normal_context = nn.Parameter(torch.randn(sets, prompt_length, width) * 0.02)  # (P, n, W)
        if abnormal:
            abnormal_tokens = _prompt_tokens(text_model, tokenizer, f"{placeholder} {abnormal_template}")
            self.register_buffer("abnormal_tokens", abnormal_tokens, persistent=False)
            self.abnormal_context = nn.Parameter(torch.randn(sets, prompt_length, width) * 0.02)
        else:
            self.abnormal_tokens = None
            self.abnormal_context = None

    def _encode(self, text_model: OpenCLIP, context: Tensor, tokens: Tensor) -> list[Tensor]:
        sets = context.shape[0]
        tokens = tokens.expand(sets, -1)  # (P, T)
        embedded = text_model.token_embedding(tokens).to(context.dtype)  # (P, T, W)
        n = self.prompt_length
        embedded = torch.cat([embedded[:, :1], context, embedded[:, 1 + n :]], dim=1)  # SOT, [V1..Vn], template, EOT
        features = encode_text_embeddings(text_model, embedded, tokens)  # (P, E)
        return [features[min(level, sets - 1)] for level in range(self.num_levels)]

    def forward(self, text_model: OpenCLIP) -> TextFeatures:
        normal = self._encode(text_model, self.normal_context, self.normal_tokens)
        abnormal = None
        if self.abnormal_context is not None and self.abnormal_tokens is not None:
            abnormal = self._encode(text_model, self.abnormal_context, self.abnormal_tokens)
        return TextFeatures(normal, abnormal)


class NormalityVectors(nn.Module):
    """Learned normality vectors for an encoder without a text tower: one per level in its feature space.

    Args:
        dims: feature width of each level.
        abnormal: also learn abnormal vectors.
        shared_context: one vector for all levels (needs equal widths).
    """

    def __init__(self, dims: Sequence[int], abnormal: bool = False, shared_context: bool = False) -> None:
        super().__init__()
        if shared_context and len(set(dims)) > 1:
            raise ValueError(f"shared_context needs levels of one width, got widths {list(dims)}")
        self.num_levels = len(dims)
        sizes = dims[:1] if shared_context else dims
        self.normal = nn.ParameterList([nn.Parameter(torch.randn(d) * 0.02) for d in sizes])
        self.abnormal = nn.ParameterList([nn.Parameter(torch.randn(d) * 0.02) for d in sizes]) if abnormal else None

    def _expand(self, vectors: nn.ParameterList) -> list[Tensor]:
        return [F.normalize(vectors[min(level, len(vectors) - 1)], dim=-1) for level in range(self.num_levels)]

    def forward(self, text_model: OpenCLIP | None = None) -> TextFeatures:
        abnormal = self._expand(self.abnormal) if self.abnormal is not None else None
        return TextFeatures(self._expand(self.normal), abnormal)
