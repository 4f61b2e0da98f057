"""CNC's training objective as pure functions of tensors (docs/method.md, Training objective).

Per tapped level l, with ê, d̂ the L2-normalised joint-space encoder / decoder tokens and t_l the normal text feature:

- reconstruction ``L_rec = Σ_l mean_i (1 - cos(e_i, d_i))`` on the raw tokens; option (Dinomaly's hard-mined
  cosine): the best-reconstructed share of each level's tokens gets its gradient scaled down, so the decoder stops
  polishing what it already reconstructs (the loose reconstruction that keeps it from generalising to anomalies);
- cross-modal feature distillation ``L_cfd = Σ_l mean_i (1 - cos(sg(ê_i), t_l))``: gradient reaches the prompts only
  (option ``pool="softmax"``: tokens pooled per image with weights ``softmax_i(cos(ê_i, t_l) / τ)`` first); with an
  abnormal prompt, a cross-entropy term also asks CLIP to call the normal tokens normal rather than abnormal [ours];
- normality-guided decoding ``L_ngd = Σ_l mean_i (1 - cos(d̂_i, sg(t_l)))``: gradient reaches the decoder side only;
  the ``hinge`` form ``Σ_l mean_i max(0, cos(sg(ê_i), t_l) - cos(d̂_i, t_l))`` acts only where the decoded token is
  farther from normality than its encoder token, so it never pulls a normal reconstruction away from its target;
- MoE balance: the squared coefficient of variation of the expert importance.

``total_loss`` adds them with the λ weights and returns a dict with ``"loss"`` and one entry per term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def reconstruction_loss(
    encoder: Sequence[Tensor], decoder: Sequence[Tensor], hard_share: float = 0.0, easy_factor: float = 0.1
) -> Tensor:
    """Σ_l mean over tokens of ``1 - cos(e, d)``, optionally hard-mined.

    Args:
        encoder: per level (B, L, C_l) encoder tokens (targets; no gradient is needed).
        decoder: per level (B, L, C_l) decoded tokens.
        hard_share: share in [0, 1) of each level's tokens (over the batch) with the smallest distance whose gradient
            is multiplied by ``easy_factor``; the loss value is unchanged (Dinomaly's ``global_cosine_hm_percent``,
            per token). 0 = plain loss.
        easy_factor: gradient scale of those easy tokens.
    """
    total: float | Tensor = 0.0
    for e, d in zip(encoder, decoder, strict=True):
        distance = 1.0 - F.cosine_similarity(e.to(d.dtype), d, dim=-1)  # (B, L)
        if hard_share > 0.0:
            flat = distance.detach().flatten()
            easy = int(flat.numel() * hard_share)
            if easy > 0:
                threshold = flat.kthvalue(easy).values
                scale = torch.where(distance.detach() <= threshold, easy_factor, 1.0).to(distance.dtype)
                distance = distance * scale + (distance * (1.0 - scale)).detach()  # value kept, gradient scaled
        total = total + distance.mean()
    return torch.as_tensor(total)


def hard_mining_share(step: int, share: float, ramp_steps: int) -> float:
    """The hard-mined share at optimiser step ``step``: linear from 0 to ``share`` over ``ramp_steps`` steps."""
    if share <= 0.0:
        return 0.0
    return share * min(1.0, step / ramp_steps) if ramp_steps > 0 else share


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
    total: float | Tensor = 0.0
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


def ngd_loss(
    decoder_joint: Sequence[Tensor],
    normal: Sequence[Tensor],
    form: str = "pull",
    encoder_joint: Sequence[Tensor] | None = None,
) -> Tensor:
    """Normality-guided decoding: decoded tokens are pulled toward the (detached) normal text feature.

    Args:
        decoder_joint: per level (B, L, J) decoded tokens in the joint space.
        normal: per level (J,) normal text features; detached, so the prompts get no gradient from this term.
        form: ``"pull"`` (``1 - cos(d̂, t)`` on every token) or ``"hinge"`` (``max(0, cos(ê, t) - cos(d̂, t))``: only
            decoded tokens less normal than their encoder token are pulled, and only up to it).
        encoder_joint: per level (B, L, J) encoder tokens in the joint space; needed by ``"hinge"`` (detached).
    """
    if form not in ("pull", "hinge"):
        raise ValueError(f"unknown ngd form {form!r}; choose 'pull' or 'hinge'")
    if form == "hinge" and encoder_joint is None:
        raise ValueError("the hinge form of ngd needs the encoder tokens")
    total: float | Tensor = 0.0
    for level, (d, t) in enumerate(zip(decoder_joint, normal, strict=True)):
        cos_decoded = F.cosine_similarity(d, t.detach().to(d.dtype).expand_as(d), dim=-1)  # (B, L)
        if form == "pull":
            total = total + (1.0 - cos_decoded).mean()
        else:
            assert encoder_joint is not None  # checked above
            e = encoder_joint[level].detach().to(d.dtype)
            cos_encoded = F.cosine_similarity(e, t.detach().to(d.dtype).expand_as(e), dim=-1)  # (B, L)
            total = total + F.relu(cos_encoded - cos_decoded).mean()
    return torch.as_tensor(total)


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
