"""Loss terms (docs/method.md, Training objective): zero when they should be, gradients only where the method says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnc_ad.config import ModelConfig
from cnc_ad.losses import (
    cfd_loss,
    hard_mining_share,
    moe_balance_loss,
    ngd_loss,
    reconstruction_loss,
    total_loss,
)
from cnc_ad.model import build_model


def _tokens(*shape, grad=False):
    return torch.randn(*shape).requires_grad_(grad)


def test_reconstruction_zero_for_perfect_reconstruction_and_sums_levels():
    enc = [torch.randn(2, 5, 8), torch.randn(2, 5, 4)]
    assert reconstruction_loss(enc, [3.0 * e for e in enc]).item() == pytest.approx(0.0, abs=1e-6)
    assert reconstruction_loss(enc, [-e for e in enc]).item() == pytest.approx(4.0, abs=1e-5)  # 2 levels x 2


@pytest.mark.parametrize("pool", ["mean", "softmax"])
def test_cfd_zero_when_tokens_match_text_and_gradient_to_text_only(pool):
    text = torch.randn(6)
    aligned = text.expand(2, 5, 6) * 2.0
    assert cfd_loss([aligned], [text], pool=pool).item() == pytest.approx(0.0, abs=1e-6)
    tokens = _tokens(2, 5, 6, grad=True)
    text = _tokens(6, grad=True)
    loss = cfd_loss([tokens], [text], pool=pool, tau=0.1)
    loss.backward()
    assert tokens.grad is None and text.grad.abs().sum() > 0


def test_cfd_abnormal_term_prefers_normal():
    normal, abnormal = torch.eye(4)[0], torch.eye(4)[1]
    tokens = normal.expand(1, 3, 4)
    base = cfd_loss([tokens], [normal])
    with_abnormal = cfd_loss([tokens], [normal], abnormal=[abnormal], logit_scale=100.0)
    assert with_abnormal.item() == pytest.approx(base.item(), abs=1e-6)  # -log p(normal) ~ 0
    wrong = cfd_loss([tokens], [abnormal], abnormal=[normal], logit_scale=100.0)
    assert wrong.item() > 50


def test_ngd_zero_when_decoded_tokens_match_text_and_gradient_to_decoder_only():
    text = torch.randn(6)
    assert ngd_loss([text.expand(2, 5, 6) * 0.5], [text]).item() == pytest.approx(0.0, abs=1e-6)
    decoded = _tokens(2, 5, 6, grad=True)
    text = _tokens(6, grad=True)
    ngd_loss([decoded], [text]).backward()
    assert text.grad is None and decoded.grad.abs().sum() > 0


def test_hard_mining_keeps_the_value_and_scales_the_easy_gradients():
    torch.manual_seed(0)
    enc = [torch.randn(2, 10, 6)]
    decoded = enc[0] + 0.05 * torch.arange(1.0, 21.0).view(2, 10, 1) * torch.randn(2, 10, 6)  # ever worse tokens
    plain_d = decoded.clone().requires_grad_(True)
    mined_d = decoded.clone().requires_grad_(True)
    plain = reconstruction_loss(enc, [plain_d])
    mined = reconstruction_loss(enc, [mined_d], hard_share=0.5, easy_factor=0.1)
    assert mined.item() == pytest.approx(plain.item(), abs=1e-6)
    plain.backward()
    mined.backward()
    distance = 1 - F.cosine_similarity(enc[0], decoded, dim=-1).flatten()
    easy = distance <= distance.kthvalue(10).values  # the 50 % best-reconstructed tokens
    ratio = mined_d.grad.norm(dim=-1).flatten() / plain_d.grad.norm(dim=-1).flatten()
    torch.testing.assert_close(ratio[easy], torch.full((10,), 0.1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ratio[~easy], torch.ones(10), atol=1e-4, rtol=1e-4)


def test_hard_mining_share_ramps_linearly():
    assert hard_mining_share(0, 0.9, 100) == 0.0
    assert hard_mining_share(50, 0.9, 100) == pytest.approx(0.45)
    assert hard_mining_share(500, 0.9, 100) == pytest.approx(0.9)
    assert hard_mining_share(500, 0.0, 100) == 0.0


def test_ngd_hinge_leaves_a_perfect_reconstruction_alone():
    torch.manual_seed(0)
    text = torch.randn(6)
    enc = torch.randn(2, 5, 6)
    decoded = enc.clone().requires_grad_(True)
    hinge = ngd_loss([decoded], [text], form="hinge", encoder_joint=[enc])
    assert hinge.item() == 0.0
    assert ngd_loss([enc], [text], form="pull").item() > 0.1  # the paper's form pulls it all the same
    # A decoded token less normal than its encoder token is pulled back, up to the encoder token only.
    worse = (enc - 2.0 * text).requires_grad_(True)
    hinge = ngd_loss([worse], [text], form="hinge", encoder_joint=[enc])
    hinge.backward()
    assert hinge.item() > 0 and worse.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="encoder tokens"):
        ngd_loss([enc], [text], form="hinge")


def test_total_loss_weights_and_missing_terms():
    rec = torch.tensor(1.0)
    out = total_loss(rec, torch.tensor(2.0), None, torch.tensor(4.0), lambda_cfd=0.5, lambda_ngd=9.0, lambda_moe=0.25)
    assert out["loss"].item() == pytest.approx(3.0) and out["ngd"].item() == 0.0
    assert set(out) == {"loss", "rec", "cfd", "ngd", "moe"}
    assert moe_balance_loss(torch.ones(5)).item() == 0.0


def _grad_owners(model, loss):
    groups = {"prompts": model.prompts, "bottleneck": model.bottleneck, "moe": model.moe, "decoder": model.decoder,
              "encoder": model.encoder}  # fmt: skip
    owners = set()
    for name, module in groups.items():
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            continue
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        if any(g is not None and g.abs().sum() > 0 for g in grads):
            owners.add(name)
    return owners


@pytest.mark.parametrize("preset", ["tiny", "cnc-effnet-lite0"])
def test_model_terms_reach_only_their_parts(preset):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=preset), pretrained=False).train()
    features = model.encode(torch.rand(2, 3, model.image_size, model.image_size))
    losses = model.training_losses(features)
    assert _grad_owners(model, losses["cfd"]) == {"prompts"}
    assert _grad_owners(model, losses["ngd"]) == {"bottleneck", "moe", "decoder"}
    assert _grad_owners(model, losses["rec"]) == {"bottleneck", "moe", "decoder"}
    assert _grad_owners(model, losses["moe"]) == {"bottleneck", "moe"}
