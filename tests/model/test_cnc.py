"""The CNC detector: every preset builds on random weights, decodes, trains, predicts; the encoder stays frozen."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cnc_ad.config import ModelConfig
from cnc_ad.errors import ConfigError, DataError, TextFeaturesError
from cnc_ad.model import PRESETS, CNCOutput, Prediction, build_model
from cnc_ad.model.anomaly_map import GaussianBlur, image_score


def _check_preset(name: str, batch: int = 2, **overrides) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=name, **overrides), pretrained=False)
    assert model.config.pretrained == "none"
    assert all(getattr(model.config, f) is not None for f in ("encoder", "backbone", "layers", "width"))
    images = torch.rand(batch, 3, model.image_size, model.image_size)
    features = model.encode(images)
    assert len(features) == model.num_levels
    assert all(f.shape[:2] == (batch, model.grid_size**2) and not f.requires_grad for f in features)
    model.train()
    losses = model.training_losses(features)
    assert {k for k in losses if not k.startswith("diag_")} == {"loss", "rec", "cfd", "ngd", "moe"}
    assert all(torch.isfinite(v) for v in losses.values())
    levels = range(model.num_levels)
    diagnostics = {f"diag_cos_{side}_{level}" for side in ("enc", "dec") for level in levels}
    diagnostics |= {f"diag_load_{e}" for e in range(model.config.num_experts)}
    assert {k for k in losses if k.startswith("diag_")} == diagnostics
    assert sum(losses[f"diag_load_{e}"].item() for e in range(model.config.num_experts)) == pytest.approx(1.0)
    assert not any(v.requires_grad for k, v in losses.items() if k.startswith("diag_"))
    losses["loss"].backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.trainable_parameters())
    model.eval()
    model.store_text_features()  # as training does before it writes a checkpoint
    prediction = model.predict(images, map_size=48)
    assert isinstance(prediction, Prediction)
    assert prediction.score.shape == (batch,) and prediction.anomaly_map.shape == (batch, 1, 48, 48)
    assert torch.isfinite(prediction.anomaly_map).all()


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("tiny", {}),
        ("cnc-effnet-lite0", {}),
        ("tiny", {"attention": "linear"}),
        ("tiny", {"position_embedding": True}),
        ("cnc-effnet-lite0", {"backbone": "tf_efficientnet_lite0", "normalize": "inception", "token_stride": 8}),
    ],
)
def test_preset_shapes_losses_and_gradients(name, overrides):
    _check_preset(name, **overrides)


def test_token_stride_sets_the_grid_and_normalize_the_input():
    config = ModelConfig(preset="cnc-effnet-lite0", token_stride=8, normalize="inception")
    model = build_model(config, pretrained=False)
    assert model.grid_size == 32
    assert [f.shape for f in model.encode(torch.rand(1, 3, 256, 256))] == [(1, 1024, 24), (1, 1024, 40), (1, 1024, 112)]
    assert model.encoder.normalize.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    with pytest.raises(ConfigError, match="token_stride"):
        build_model(ModelConfig(preset="tiny", token_stride=8), pretrained=False)
    with pytest.raises(ConfigError, match="normalize"):
        build_model(ModelConfig(preset="tiny", normalize="bgr"), pretrained=False)


def test_linear_attention_matches_its_formula_and_spreads_attention():
    from cnc_ad.model.decoder import LinearAttention

    torch.manual_seed(0)
    attention = LinearAttention(8, num_heads=2, qkv_bias=True)
    x = torch.randn(2, 5, 8)
    q, k, v = attention.qkv(x).chunk(3, dim=-1)
    heads = []
    for h in range(2):
        part = slice(4 * h, 4 * h + 4)
        phi_q, phi_k = F.elu(q[..., part]) + 1, F.elu(k[..., part]) + 1  # (B, L, d)
        weights = phi_q @ phi_k.transpose(1, 2)  # (B, L, L), unnormalised positive attention
        heads.append((weights / weights.sum(-1, keepdim=True)) @ v[..., part])
    expected = attention.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attention(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnc-vitb16-224", "cnc-vitl14-336"])
def test_vit_presets(name):
    _check_preset(name, batch=1)


def test_presets_registry_is_complete():
    assert set(PRESETS) == {"tiny", "cnc-vitb16-224", "cnc-vitl14-336", "cnc-effnet-lite0"}
    vitl = PRESETS["cnc-vitl14-336"]
    assert vitl.backbone == "ViT-L-14-336-quickgelu" and vitl.layers == (5, 11, 17, 23) and vitl.image_size == 336
    assert vitl.decoder_layers == (1, 3, 5, 7) and vitl.width == 1024 and vitl.decoder_heads == 16


def test_forward_output_and_mode_independent_type(tiny_model):
    features = tiny_model.encode(torch.rand(2, 3, 32, 32))
    for mode in (True, False):
        tiny_model.train(mode)
        out = tiny_model(features)
        assert isinstance(out, CNCOutput)
        assert [d.shape for d in out.decoder] == [f.shape for f in features]
        assert out.gates.shape == (2, 64, 5) and out.importance.shape == (5,)
    tiny_model.eval()


def test_train_keeps_encoder_frozen_and_in_eval_mode(tiny_model):
    tiny_model.train()
    assert not tiny_model.encoder.training and not any(m.training for m in tiny_model.encoder.modules())
    assert tiny_model.decoder.training
    assert not any(p.requires_grad for p in tiny_model.encoder.parameters())
    trainable = {id(p) for p in tiny_model.trainable_parameters()}
    assert not trainable & {id(p) for p in tiny_model.encoder.parameters()}
    tiny_model.eval()


def test_features_from_cache_dtype(tiny_model):
    tiny_model.eval()
    features = tiny_model.encode(torch.rand(1, 3, 32, 32))
    out16 = tiny_model([f.half() for f in features])
    assert out16.decoder[0].dtype == torch.float32


def test_plain_reconstruction_when_switched_off():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", use_text=False, use_moe=False), pretrained=False)
    assert model.prompts is None and model.moe is None
    losses = model.training_losses(model.encode(torch.rand(2, 3, 32, 32)), lambda_cfd=1.0, lambda_ngd=1.0)
    assert losses["cfd"] == 0 and losses["ngd"] == 0 and losses["moe"] == 0
    assert torch.equal(losses["loss"], losses["rec"])


def test_lambdas_are_honoured(tiny_model):
    tiny_model.eval()  # no dropout: both calls see the same network
    features = tiny_model.encode(torch.rand(2, 3, 32, 32))
    losses = tiny_model.training_losses(features, lambda_cfd=0.5, lambda_ngd=2.0, lambda_moe=3.0)
    expected = losses["rec"] + 0.5 * losses["cfd"] + 2.0 * losses["ngd"] + 3.0 * losses["moe"]
    assert torch.allclose(losses["loss"], expected)


@pytest.mark.parametrize("preset", ["tiny", "cnc-effnet-lite0"])  # CLIP prompts; a CNN's learned normality vectors
def test_a_model_whose_text_features_were_never_stored_is_refused(preset):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=preset, fnp=True), pretrained=False).eval()
    images = torch.rand(1, 3, model.image_size, model.image_size)
    assert "text_stored" in model.checkpoint_state_dict() and not model.text_features_stored()
    for call in (
        lambda: model.predict(images),
        lambda: model.anomaly_maps(images),
        lambda: model.maps_from_output(model(model.encode(images))),
        model.stored_text_features,
    ):
        with pytest.raises(TextFeaturesError, match=r"never stored.*model\.store_text_features\(\)"):
            call()
    model.store_text_features()
    assert model.text_features_stored() and bool(model.checkpoint_state_dict()["text_stored"])
    assert model.predict(images).score.shape == (1,)


def test_a_model_without_prompts_has_nothing_to_store():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", use_text=False), pretrained=False).eval()
    assert model.text_features_stored() and "text_stored" not in model.state_dict()
    assert model.predict(torch.rand(1, 3, 32, 32)).score.shape == (1,)


def test_fnp_maps_use_the_stored_buffers_only(monkeypatch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", fnp=True), pretrained=False).eval()
    model.store_text_features()
    images = torch.rand(2, 3, 32, 32)
    first = model.predict(images, map_size=32)
    assert torch.allclose(model.normal_text_0.norm(), torch.tensor(1.0))
    with torch.no_grad():  # prompts changed after storing: inference still reads the stored features
        model.prompts.normal_context.add_(1.0)
    calls = []
    monkeypatch.setattr(model.prompts, "forward", lambda *a: calls.append(1))
    second = model.predict(images, map_size=32)
    assert not calls and torch.equal(first.anomaly_map, second.anomaly_map)
    model.normal_text_0.copy_(-model.normal_text_0)  # another stored feature: another map
    assert not torch.allclose(model.predict(images, map_size=32).anomaly_map, first.anomaly_map)


def test_fnp_changes_the_map():
    torch.manual_seed(0)
    plain = build_model(ModelConfig(preset="tiny"), pretrained=False).eval()
    fnp = build_model(ModelConfig(preset="tiny", fnp=True, fnp_theta=5.0), pretrained=False).eval()
    plain.store_text_features()
    fnp.load_state_dict(plain.state_dict())
    images = torch.rand(2, 3, 32, 32)
    assert not torch.allclose(plain.predict(images).anomaly_map, fnp.predict(images).anomaly_map)


def test_position_embedding_tells_the_decoder_where_a_token_is():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", position_embedding=True), pretrained=False).eval()
    assert model.position is not None and model.position.shape == (1, model.grid_size**2, model.config.width)
    features = model.encode(torch.rand(1, 3, 32, 32))
    flipped = [f.flip(1) for f in features]  # the same tokens in reverse order
    decoded = model(features).decoder[0]
    decoded_flipped = model(flipped).decoder[0]
    assert not torch.allclose(decoded.flip(1), decoded_flipped, atol=1e-5)  # positions matter
    model.position.data.zero_()  # without it the decoder is blind to the order (permutation-equivariant)
    assert torch.allclose(model(features).decoder[0].flip(1), model(flipped).decoder[0], atol=1e-5)
    assert "position" not in build_model(ModelConfig(preset="tiny"), pretrained=False).state_dict()


def test_map_levels_choose_the_levels_of_the_map():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny"), pretrained=False).eval()
    model.store_text_features()
    images = torch.rand(2, 3, 32, 32)
    output = model(model.encode(images))
    everything = model.maps_from_output(output)
    model.config = dataclasses.replace(model.config, map_levels=(0,))
    first = model.maps_from_output(output)
    assert not torch.allclose(everything, first)
    one_level = output._replace(decoder=output.decoder[:1], encoder=output.encoder[:1])
    assert torch.allclose(first, model.maps_from_output(one_level))
    with pytest.raises(ConfigError, match=r"model\.map_levels"):
        build_model(ModelConfig(preset="tiny", map_levels=(2, 1)), pretrained=False)
    with pytest.raises(ConfigError, match=r"model\.score_levels"):
        build_model(ModelConfig(preset="tiny", score_levels=()), pretrained=False)
    with pytest.raises(ConfigError, match=r"model\.map_levels"):
        build_model(ModelConfig(preset="tiny", map_levels=(4,)), pretrained=False)


def test_score_levels_read_the_score_from_their_own_map():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", map_levels=(0, 1)), pretrained=False).eval()
    model.store_text_features()
    images = torch.rand(3, 3, 32, 32)
    fine = model.predict(images)
    assert torch.allclose(fine.score, image_score(fine.anomaly_map, "max"))  # score and map: the same levels
    model.config = dataclasses.replace(model.config, score_levels=(0, 1, 2, 3))  # default: the map's levels
    split = model.predict(images)
    assert torch.equal(split.anomaly_map, fine.anomaly_map)  # the map keeps its levels
    model.config = dataclasses.replace(model.config, map_levels=None, score_levels=None)
    everything = model.predict(images)
    assert torch.allclose(split.score, everything.score)  # the score is that of the map of all levels
    assert not torch.allclose(split.score, fine.score)
    assert torch.allclose(model.predict(images, score="top1").score, image_score(everything.anomaly_map, "top1"))


def test_scores_and_blur():
    maps = torch.zeros(2, 1, 64, 64)
    maps[0, 0, 30, 30] = 100.0
    assert image_score(maps, "max").tolist() == [100.0, 0.0]
    assert image_score(maps, "top1")[0] == pytest.approx(100.0 / 40)  # k = floor(4096 * 1 %) = 40
    assert image_score(maps, "pool16")[0] == pytest.approx(100.0 / 256)
    blurred = GaussianBlur(4.0)(maps)
    assert blurred.sum() == pytest.approx(100.0, rel=1e-4)  # mass kept away from the border
    assert blurred[0, 0].argmax() == 30 * 64 + 30
    scipy = pytest.importorskip("scipy.ndimage")
    reference = scipy.gaussian_filter(maps[0, 0].numpy(), sigma=4, mode="mirror")
    assert torch.allclose(blurred[0, 0], torch.from_numpy(reference), atol=1e-5)


def test_bad_input_and_bad_config(tiny_model):
    with pytest.raises(DataError, match="images must be"):
        tiny_model.encode(torch.rand(1, 3, 16, 16))
    with pytest.raises(ConfigError, match=r"model.preset"):
        build_model(ModelConfig(preset="nope"), pretrained=False)
    with pytest.raises(ConfigError, match=r"model.decoder_layers"):
        build_model(ModelConfig(preset="tiny", decoder_layers=(0, 1)), pretrained=False)
    with pytest.raises(ConfigError, match=r"model\.backbone"):
        build_model(ModelConfig(preset="cnc-effnet-lite0", backbone="no_such_net"), pretrained=False)
    with pytest.raises(ConfigError, match=r"model\.backbone"):
        build_model(ModelConfig(preset="cnc-vitb16-224", backbone="ViT-Nope"), pretrained=False)
    with pytest.raises(ConfigError, match=r"model.score"):
        build_model(ModelConfig(preset="tiny", score="median"), pretrained=False)


def test_random_backbone_is_deterministic_and_leaves_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_model(ModelConfig(preset="tiny"), pretrained=False)
    torch.set_rng_state(state)
    b = build_model(ModelConfig(preset="tiny"), pretrained=False)
    for (name, x), (_, y) in zip(a.encoder.state_dict().items(), b.encoder.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_resolved_config_round_trips():
    model = build_model(ModelConfig(preset="cnc-effnet-lite0"), pretrained=False)
    again = build_model(dataclasses.replace(model.config), pretrained=False)
    assert again.config == model.config
