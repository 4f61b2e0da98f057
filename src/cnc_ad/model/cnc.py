"""The CNC detector (Wang et al., "CNC: Cross-modal Normality Constraint for Unsupervised Multi-class Anomaly
Detection", AAAI 2025), composed from injected parts (docs/method.md: Model, Training objective, Inference).

    images -> frozen encoder -> per-level tokens e_l ----------------------------------------+
                                      |                                                        | 1 - cos -> map
                                      +-> bottleneck -> gated MoE -> decoder -> per-level d_l -+

Training adds the cross-modal normality constraint: class-agnostic learnable prompts give a normal text feature t_l per
level, pulled toward the encoder's normal tokens (CFD) while the decoded tokens are pulled toward it (NGD). Text
features are constants after training: :meth:`CNC.store_text_features` keeps them in buffers (``normal_text_<l>``,
``abnormal_text_<l>``) and sets the ``text_stored`` flag buffer; training calls it at the end and before every
checkpoint, and the checkpoint writer calls it too. Inference reads the buffers and never runs the text tower: it
refuses a model whose text features were never stored (:class:`cnc_ad.errors.TextFeaturesError`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cnc_ad.config import ModelConfig
from cnc_ad.errors import DataError, TextFeaturesError
from cnc_ad.losses import cfd_loss, ngd_loss, reconstruction_loss, total_loss
from cnc_ad.model.anomaly_map import GaussianBlur, discrepancy, fnp_weight, image_score, tokens_to_grid
from cnc_ad.model.decoder import Bottleneck, Decoder
from cnc_ad.model.encoders import Encoder
from cnc_ad.model.moe import GatedMoE
from cnc_ad.model.prompts import NormalityVectors, PromptLearner, TextFeatures

# CLIP's initial logit scale (1 / 0.07), used by the abnormal-prompt term when the encoder has no text tower.
DEFAULT_LOGIT_SCALE = 1.0 / 0.07


class CNCOutput(NamedTuple):
    """What :meth:`CNC.forward` returns; the same fields in train and eval mode."""

    encoder: list[Tensor]  # per level (B, L, C_l) encoder tokens, the reconstruction targets
    decoder: list[Tensor]  # per level (B, L, C_l) decoded tokens
    gates: Tensor  # (B, L, E) MoE gates; (B, L, 0) without MoE
    importance: Tensor  # (E,) expert importance; (0,) without MoE
    balance_loss: Tensor  # () MoE load-balance loss; 0 without MoE


class Prediction(NamedTuple):
    score: Tensor  # (B,) image anomaly score
    anomaly_map: Tensor  # (B, 1, M, M) smoothed pixel anomaly map


class CNC(nn.Module):
    """Reverse-distillation anomaly detector with gated MoE and a cross-modal normality constraint.

    Args:
        encoder: the frozen encoder (:class:`cnc_ad.model.encoders.Encoder`).
        config: the resolved model config (every preset field filled, see :func:`cnc_ad.model.build_model`).
        tokenizer: open_clip tokenizer for the prompts; needed when the encoder has a text tower and ``use_text``.
    """

    text_stored: Tensor  # () bool buffer, with prompts only: the normal_text_<l> / abnormal_text_<l> buffers are set

    def __init__(
        self, encoder: Encoder, config: ModelConfig, tokenizer: Callable[[list[str]], Tensor] | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.image_size = encoder.image_size
        self.grid_size = encoder.grid_size
        self.num_levels = len(encoder.level_dims)
        width, depth, heads = config.width, config.decoder_depth, config.decoder_heads
        decoder_layers = config.decoder_layers
        assert width is not None and depth is not None and heads is not None and decoder_layers is not None  # resolved
        self.bottleneck = Bottleneck(encoder.level_dims, width, config.bottleneck_dropout)
        self.position = None
        if config.position_embedding:
            self.position = nn.Parameter(torch.zeros(1, self.grid_size**2, width))  # (1, L, D)
            nn.init.trunc_normal_(self.position, std=0.02)
        self.moe = GatedMoE(width, config.num_experts, config.top_k, config.expert_ratio) if config.use_moe else None
        self.decoder = Decoder(
            width,
            depth,
            heads,
            decoder_layers,
            encoder.level_dims,
            config.mlp_ratio,
            config.attention,
        )
        self.prompts: PromptLearner | NormalityVectors | None = None
        self.logit_scale = DEFAULT_LOGIT_SCALE
        if config.use_text:
            text_model: Any = encoder.text_model  # open_clip's CLIP, or None
            if text_model is not None:
                if tokenizer is None:
                    raise ValueError("an encoder with a text tower needs a tokenizer for the prompts")
                self.prompts = PromptLearner(
                    text_model,
                    tokenizer,
                    self.num_levels,
                    config.prompt_length,
                    config.normal_template,
                    config.abnormal_prompt,
                    config.abnormal_template,
                    config.shared_context,
                )
                self.logit_scale = float(text_model.logit_scale.exp().item())
            else:
                self.prompts = NormalityVectors(encoder.joint_dims, config.abnormal_prompt, config.shared_context)
            for level, dim in enumerate(encoder.joint_dims):
                self.register_buffer(f"normal_text_{level}", torch.zeros(dim))
                if config.abnormal_prompt:
                    self.register_buffer(f"abnormal_text_{level}", torch.zeros(dim))
            # Whether the buffers above hold the prompts' features: set by store_text_features, saved in checkpoints.
            self.register_buffer("text_stored", torch.tensor(False))
        self.blur = GaussianBlur(config.blur_sigma)

    # ----------------------------------------------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> CNC:
        """Set the trainable parts' mode; the encoder always stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates (bottleneck, MoE, decoder, prompts); the encoder is frozen."""
        return [p for p in self.parameters() if p.requires_grad]

    def checkpoint_state_dict(self) -> dict[str, Tensor]:
        """Every tensor a checkpoint needs: trainable parameters and stored text features, not the frozen encoder."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("encoder.")}

    # ---------------------------------------------------------------------------------------------- encode/decode
    @torch.no_grad()
    def encode(self, images: Tensor) -> list[Tensor]:
        """Frozen encoder features.

        Args:
            images: (B, 3, S, S) RGB in [0, 1], not normalised, ``S = image_size``.

        Returns:
            per level (B, L, C_l) tokens, ``L = grid_size ** 2``.
        """
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise DataError(
                f"images must be (B, 3, {self.image_size}, {self.image_size}) RGB in [0, 1], got {tuple(images.shape)}"
            )
        return self.encoder(images)

    def forward(self, features: list[Tensor]) -> CNCOutput:
        """Decode encoder features (fresh from :meth:`encode` or cached, any float dtype).

        Args:
            features: per level (B, L, C_l) encoder tokens.
        """
        dtype = self.bottleneck.proj.weight.dtype
        features = [f.to(dtype) for f in features]
        x = self.bottleneck(features)  # (B, L, D)
        if self.position is not None:
            x = x + self.position.to(x.dtype)
        if self.moe is not None:
            moe = self.moe(x)
            x, gates, importance, balance = moe.output, moe.gates, moe.importance, moe.balance_loss
        else:
            gates, importance, balance = x.new_zeros(*x.shape[:2], 0), x.new_zeros(0), x.new_zeros(())
        decoded = self.decoder(x)  # per level (B, L, C_l)
        return CNCOutput(features, decoded, gates, importance, balance)

    # -------------------------------------------------------------------------------------------------- training
    def text_features(self) -> TextFeatures:
        """Normality features from the current prompts (runs the text tower, with gradient to the prompts)."""
        if self.prompts is None:
            raise ValueError("this model has no prompts (model.use_text is false)")
        return self.prompts(self.encoder.text_model)

    def training_losses(
        self,
        features: list[Tensor],
        lambda_cfd: float = 1.0,
        lambda_ngd: float = 0.1,
        lambda_moe: float = 0.01,
        *,
        ngd: str = "pull",
        hard_share: float = 0.0,
        hard_factor: float = 0.1,
    ) -> dict[str, Tensor]:
        """The training objective on a batch of encoder features (docs/method.md, "Training objective").

        Args:
            features: per level (B, L, C_l) encoder tokens.
            lambda_cfd: weight of the cross-modal feature distillation term.
            lambda_ngd: weight of the normality-guided decoding term.
            lambda_moe: weight of the MoE balance term.
            ngd: form of the normality-guided decoding term, ``"pull"`` or ``"hinge"`` (see :func:`ngd_loss`).
            hard_share: share of the best-reconstructed tokens whose gradient is scaled by ``hard_factor`` (0: off).
            hard_factor: that gradient scale.

        Returns:
            ``{"loss", "rec", "cfd", "ngd", "moe"}`` scalar tensors; terms switched off by the config
            (``use_text=False``: cfd, ngd; ``use_moe=False``: moe) are 0-valued tensors. Diagnostics (no gradient),
            whose keys start with ``diag_``: per level ``diag_cos_enc_<l>`` / ``diag_cos_dec_<l>``, the mean cosine of
            the encoder / decoded tokens to the normality feature; with MoE, ``diag_load_<e>``, the share of token
            assignments routed to expert ``e``.
        """
        out = self(features)
        rec = reconstruction_loss(out.encoder, out.decoder, hard_share, hard_factor)
        cfd = ngd_term = None
        diagnostics: dict[str, Tensor] = {}
        if self.prompts is not None:
            text = self.text_features()
            with torch.no_grad():
                encoder_joint = [self.encoder.to_joint(level, e) for level, e in enumerate(out.encoder)]
            decoder_joint = [self.encoder.to_joint(level, d) for level, d in enumerate(out.decoder)]
            cfd = cfd_loss(
                encoder_joint, text.normal, self.config.cfd_pool, self.config.cfd_tau, text.abnormal, self.logit_scale
            )
            ngd_term = ngd_loss(decoder_joint, text.normal, ngd, encoder_joint)
            with torch.no_grad():
                for level, (e, d, t) in enumerate(zip(encoder_joint, decoder_joint, text.normal, strict=True)):
                    t = F.normalize(t.detach().float(), dim=-1)
                    diagnostics[f"diag_cos_enc_{level}"] = (F.normalize(e.float(), dim=-1) @ t).mean()
                    diagnostics[f"diag_cos_dec_{level}"] = (F.normalize(d.detach().float(), dim=-1) @ t).mean()
        moe = out.balance_loss if self.moe is not None else None
        if self.moe is not None:
            load = (out.gates.detach() > 0).float().flatten(0, 1).mean(dim=0) / self.config.top_k  # (E,)
            diagnostics.update({f"diag_load_{e}": share for e, share in enumerate(load)})
        losses = total_loss(
            rec, cfd, ngd_term, moe, lambda_cfd=lambda_cfd, lambda_ngd=lambda_ngd, lambda_moe=lambda_moe
        )
        return {**losses, **diagnostics}

    @torch.no_grad()
    def store_text_features(self) -> None:
        """Compute the text features from the learned prompts, keep them in buffers for inference and export, and set
        the ``text_stored`` flag. Training calls it at its end and before each checkpoint, the checkpoint writer
        before writing; call it yourself after changing the prompts in any other way. No-op without prompts.
        """
        if self.prompts is None:
            return
        text = self.text_features()
        for level in range(self.num_levels):
            getattr(self, f"normal_text_{level}").copy_(text.normal[level])
            if text.abnormal is not None:
                getattr(self, f"abnormal_text_{level}").copy_(text.abnormal[level])
        self.text_stored.fill_(True)

    def text_features_stored(self) -> bool:
        """Whether inference can run: the text features were stored (always true for a model without prompts)."""
        return self.prompts is None or bool(self.text_stored)

    def require_text_features(self) -> None:
        """Raise :class:`cnc_ad.errors.TextFeaturesError` unless :meth:`text_features_stored`.

        Every inference entry point calls it once; while a graph is traced it does nothing (an export calls it before
        tracing, and the flag is no part of the graph).
        """
        if torch.jit.is_tracing():
            return
        if not self.text_features_stored():
            raise TextFeaturesError(
                "this model's text features were never stored, so it cannot predict (it was built but never trained "
                "or saved); train it, load a checkpoint, or call model.store_text_features() after setting its prompts"
            )

    def stored_text_features(self) -> TextFeatures:
        """The stored normality features (the buffers; the text tower does not run).

        Raises:
            TextFeaturesError: they were never stored (:meth:`store_text_features`).
            ValueError: the model has no prompts (``model.use_text`` is false).
        """
        if self.prompts is None:
            raise ValueError("this model has no prompts (model.use_text is false)")
        self.require_text_features()
        return self._text_buffers()

    def _text_buffers(self) -> TextFeatures:
        normal = [getattr(self, f"normal_text_{level}") for level in range(self.num_levels)]
        abnormal = None
        if self.config.abnormal_prompt:
            abnormal = [getattr(self, f"abnormal_text_{level}") for level in range(self.num_levels)]
        return TextFeatures(normal, abnormal)

    # ------------------------------------------------------------------------------------------------- inference
    def maps_from_output(self, output: CNCOutput, map_size: int | None = None) -> Tensor:
        """Smoothed anomaly maps (B, 1, M, M) from a :class:`CNCOutput` (docs/method.md, Inference).

        With ``config.fnp`` the maps are weighted by the stored normal text features (the buffers).

        Raises:
            TextFeaturesError: the model has prompts whose features were never stored.
        """
        self.require_text_features()
        return self._maps_from_output(output, map_size)

    def _maps_from_output(self, output: CNCOutput, map_size: int | None) -> Tensor:
        return self._maps_and_score_maps(output, map_size)[0]

    def _maps_and_score_maps(self, output: CNCOutput, map_size: int | None) -> tuple[Tensor, Tensor]:
        """The anomaly maps of ``config.map_levels`` and the maps the image score is read from (of
        ``config.score_levels``; the same tensor when both name the same levels), each (B, 1, M, M).
        """
        text = self._text_buffers() if self.config.fnp else None
        levels = []  # per level (B, L)
        for level, (e, d) in enumerate(zip(output.encoder, output.decoder, strict=True)):
            a = discrepancy(e, d)  # (B, L)
            if text is not None:
                a = a * fnp_weight(self.encoder.to_joint(level, e), text.normal[level], self.config.fnp_theta)
            levels.append(a)
        everything = tuple(range(len(levels)))
        chosen = self.config.map_levels or everything
        scored = self.config.score_levels or chosen
        maps = self._smooth(torch.stack([levels[k] for k in chosen]).mean(dim=0), map_size)
        if tuple(scored) == tuple(chosen):
            return maps, maps
        return maps, self._smooth(torch.stack([levels[k] for k in scored]).mean(dim=0), map_size)

    def _smooth(self, tokens: Tensor, map_size: int | None) -> Tensor:
        """(B, L) token values -> (B, 1, M, M): the token grid upsampled bilinearly and blurred."""
        grid = tokens_to_grid(tokens, self.grid_size)  # (B, 1, g, g)
        size = map_size or self.config.map_size
        maps = F.interpolate(grid.float(), size=(size, size), mode="bilinear", align_corners=False)
        return self.blur(maps)  # (B, 1, M, M)

    @torch.no_grad()
    def anomaly_maps(self, images: Tensor, map_size: int | None = None) -> Tensor:
        """Smoothed anomaly maps (B, 1, M, M) of images (B, 3, S, S) in [0, 1]; ``M = map_size or config.map_size``.

        Raises:
            TextFeaturesError: the model has prompts whose features were never stored.
        """
        self.require_text_features()  # before any work is queued: the check reads the flag from the device
        return self._maps_from_output(self(self.encode(images)), map_size)

    @torch.no_grad()
    def predict(self, images: Tensor, map_size: int | None = None, score: str | None = None) -> Prediction:
        """Image scores and anomaly maps; call ``eval()`` first (dropout is active in training mode).

        Args:
            images: (B, 3, S, S) RGB in [0, 1], not normalised.
            map_size: side M of the returned maps; default ``config.map_size``.
            score: the image score rule (see :func:`image_score`); default ``config.score``.

        Returns:
            :class:`Prediction` with ``score`` (B,), read from the map of ``config.score_levels``, and
            ``anomaly_map`` (B, 1, M, M), of ``config.map_levels``.

        Raises:
            TextFeaturesError: the model has prompts whose features were never stored.
        """
        self.require_text_features()
        maps, score_maps = self._maps_and_score_maps(self(self.encode(images)), map_size)
        return Prediction(image_score(score_maps, score or self.config.score), maps)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, frozen) parameter counts."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return trainable, sum(p.numel() for p in self.parameters()) - trainable
