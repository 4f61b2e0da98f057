"""CNC's training objective as pure functions of tensors (METHOD.md §3).

Per tapped level l, with ê, d̂ the L2-normalised joint-space encoder / decoder tokens and t_l the normal text feature:

- reconstruction ``L_rec = Σ_l mean_i (1 - cos(e_i, d_i))`` on the raw tokens;
- cross-modal feature distillation ``L_cfd = Σ_l mean_i (1 - cos(sg(ê_i), t_l))``: gradient reaches the prompts only
  (option ``pool="softmax"``: tokens pooled per image with weights ``softmax_i(cos(ê_i, t_l) / τ)`` first); with an
  abnormal prompt, a cross-entropy term also asks CLIP to call the normal tokens normal rather than abnormal [ours];
- normality-guided decoding ``L_ngd = Σ_l mean_i (1 - cos(d̂_i, sg(t_l)))``: gradient reaches the decoder side only;
- MoE balance: the squared coefficient of variation of the expert importance.

``total_loss`` adds them with the λ weights and returns a dict with ``"loss"`` and one entry per term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def reconstruction_loss(encoder: Sequence[Tensor], decoder: Sequence[Tensor]) -> Tensor:
    """Σ_l mean over tokens of ``1 - cos(e, d)``.

    Args:
        encoder: per level (B, L, C_l) encoder tokens (targets; no gradient is needed).
        decoder: per level (B, L, C_l) decoded tokens.
    """
    return sum(
        (1.0 - F.cosine_similarity(e.to(d.dtype), d, dim=-1)).mean() for e, d in zip(encoder, decoder, strict=True)
    )


def cfd_loss(
    encoder_joint: Sequence[Tensor],
    normal: Sequence[Tensor],
    pool: str = "mean",
    tau: float = 0.001,
    abnormal: Sequence[Tensor] | None = None,
    logit_scale: float = 100.0,
) -> Tensor:
    """Cross-modal feature distillation: the normal text feature learns the encoder's normal tokens.

    The encoder tokens are detached, so the gradient reaches the text features (the prompts) only.

    Args:
        encoder_joint: per level (B, L, J) encoder tokens in the joint space (need not be normalised).
        normal: per level (J,) normal text features.
        pool: ``"mean"`` (mean over tokens of the cosine distance) or ``"softmax"`` (pool each image's tokens with
            weights ``softmax_i(cos(ê_i, t) / tau)`` first).
        tau: softmax temperature of ``pool="softmax"``.
        abnormal: per level (J,) abnormal text features; adds ``mean_i -log p(normal | ê_i)`` over the two prompts.
        logit_scale: scale of the cosines in that two-way softmax (CLIP's own logit scale).
    """
    if pool not in ("mean", "softmax"):
        raise ValueError(f"unknown cfd pool {pool!r}; choose 'mean' or 'softmax'")
    total = 0.0
    for level, (tokens, text) in enumerate(zip(encoder_joint, normal, strict=True)):
        tokens = F.normalize(tokens.detach().float(), dim=-1)  # (B, L, J), sg(ê)
        text = F.normalize(text.float(), dim=-1)  # (J,)
        cos = tokens @ text  # (B, L)
        if pool == "mean":
            total = total + (1.0 - cos).mean()
        else:
            weights = torch.softmax(cos / tau, dim=1)  # (B, L)
            pooled = (weights.unsqueeze(-1) * tokens).sum(dim=1)  # (B, J)
            total = total + (1.0 - F.cosine_similarity(pooled, text.expand_as(pooled), dim=-1)).mean()
        if abnormal is not None:
            wrong = tokens @ F.normalize(abnormal[level].float(), dim=-1)  # (B, L)
            logits = logit_scale * torch.stack([cos, wrong], dim=-1)  # (B, L, 2)
            total = total - torch.log_softmax(logits, dim=-1)[..., 0].mean()
    return torch.as_tensor(total)


def ngd_loss(decoder_joint: Sequence[Tensor], normal: Sequence[Tensor]) -> Tensor:
    """Normality-guided decoding: decoded tokens are pulled toward the (detached) normal text feature.

    Args:
        decoder_joint: per level (B, L, J) decoded tokens in the joint space.
        normal: per level (J,) normal text features; detached, so the prompts get no gradient from this term.
    """
    return sum(
        (1.0 - F.cosine_similarity(d, t.detach().to(d.dtype).expand_as(d), dim=-1)).mean()
        for d, t in zip(decoder_joint, normal, strict=True)
    )


def moe_balance_loss(importance: Tensor) -> Tensor:
    """Load-balance loss of a gated MoE: squared coefficient of variation of the (E,) expert importance.

    ``var(importance) / mean(importance)^2`` with the population variance; 0 when perfectly balanced.
    """
    mean = importance.mean()
    return importance.var(correction=0) / (mean * mean + 1e-10)


def total_loss(
    rec: Tensor,
    cfd: Tensor | None = None,
    ngd: Tensor | None = None,
    moe: Tensor | None = None,
    *,
    lambda_cfd: float = 1.0,
    lambda_ngd: float = 0.1,
    lambda_moe: float = 0.01,
) -> dict[str, Tensor]:
    """``L = L_rec + λ_cfd L_cfd + λ_ngd L_ngd + λ_moe L_moe``; a term that is None counts as a 0-valued tensor.

    Returns:
        ``{"loss", "rec", "cfd", "ngd", "moe"}``, all scalar tensors.
    """
    zero = rec.new_zeros(())
    cfd = zero if cfd is None else cfd
    ngd = zero if ngd is None else ngd
    moe = zero if moe is None else moe
    loss = rec + lambda_cfd * cfd + lambda_ngd * ngd + lambda_moe * moe
    return {"loss": loss, "rec": rec, "cfd": cfd, "ngd": ngd, "moe": moe}
