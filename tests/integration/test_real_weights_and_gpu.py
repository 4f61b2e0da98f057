"""Checks that need what CI does not have: real CLIP weights (``-m weights``) or a CUDA device (``-m gpu``).

They are skipped by the default run (pyproject's ``-m 'not slow and not gpu and not weights'``) and skip cleanly with
a reason when selected on a machine without the weights or the GPU:

    CNC_CLIP_WEIGHTS=/path/to/ViT-L-14-336.pt .venv/bin/pytest -m weights
    .venv/bin/pytest -m gpu

An original OpenAI ``.pt`` file is TorchScript: the test passes ``trust_pickle`` for ``.pt`` files, which is safe only
for a file you trust.
"""

import os

import pytest
import torch

from cnc_ad.config import load_config
from cnc_ad.model import build_model

WEIGHTS = os.environ.get("CNC_CLIP_WEIGHTS")
needs_weights = pytest.mark.skipif(not WEIGHTS, reason="set CNC_CLIP_WEIGHTS to a local CLIP ViT-L/14@336 file")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.weights
@needs_weights
def test_real_clip_weights_give_a_working_prompt_path():
    """The paper's backbone from a local file: the text-from-embeddings path equals encode_text; features are sane."""
    import open_clip

    from cnc_ad.model.prompts import encode_text_embeddings

    trust = WEIGHTS.endswith(".pt")  # the original OpenAI files are TorchScript
    model = build_model(load_config("mvtec").model, clip_weights=WEIGHTS, trust_pickle=trust).eval()
    clip = model.encoder.text_model
    tokens = open_clip.get_tokenizer("ViT-L-14-336-quickgelu")(["a photo of a screw."])
    direct = clip.encode_text(tokens, normalize=True)
    ours = encode_text_embeddings(clip, clip.token_embedding(tokens), tokens)
    torch.testing.assert_close(ours, direct, atol=1e-5, rtol=0)
    images = torch.rand(2, 3, model.image_size, model.image_size)
    features = model.encode(images)
    assert [f.shape[1:] for f in features] == [(576, 1024)] * 4
    assert all(torch.isfinite(f).all() for f in features)


@pytest.mark.gpu
@needs_gpu
def test_training_steps_and_predict_on_cuda(synth_root, tmp_path):
    """A few bf16 training steps on the GPU, then predict: finite losses, maps on the device, CPU-equal shapes."""
    from cnc_ad.train import train

    config = load_config(None, [f"data.root={synth_root}", "model.preset=tiny", "train.max_steps=3",
                                "train.batch_size=4", "train.device=cuda", "data.num_workers=0"])  # fmt: skip
    result = train(config, tmp_path / "run", progress=False, pretrained=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.last_loss.values())
    model = build_model(config.model, pretrained=False).cuda().eval()
    prediction = model.predict(torch.rand(2, 3, model.image_size, model.image_size, device="cuda"))
    assert prediction.anomaly_map.is_cuda and prediction.anomaly_map.shape == (2, 1, 256, 256)
