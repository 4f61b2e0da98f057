"""Prompt learner: the text-from-embeddings path equals open_clip's encode_text; learned context gets gradients."""

from __future__ import annotations

import open_clip
import pytest
import torch

from cnc_ad.config import ModelConfig
from cnc_ad.model import build_model
from cnc_ad.model.encoders import tiny_clip
from cnc_ad.model.prompts import NormalityVectors, PromptLearner, encode_text_embeddings, text_prefix_length


def test_text_from_embeddings_equals_encode_text():
    torch.manual_seed(0)
    clip = tiny_clip().eval()
    tokens = open_clip.SimpleTokenizer()(["a photo of a flawless object.", "damaged object.", "X X X object."])
    ours = encode_text_embeddings(clip, clip.token_embedding(tokens), tokens)
    reference = clip.encode_text(tokens, normalize=True)
    assert torch.allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_prompt_learner_levels_and_gradients(shared):
    torch.manual_seed(0)
    clip = tiny_clip().eval().requires_grad_(False)
    prompts = PromptLearner(clip, open_clip.SimpleTokenizer(), num_levels=3, prompt_length=4, abnormal=True,
                            shared_context=shared)  # fmt: skip
    assert prompts.normal_context.shape == (1 if shared else 3, 4, 64)
    features = prompts(clip)
    assert len(features.normal) == 3 and len(features.abnormal) == 3
    assert all(torch.allclose(t.norm(), torch.tensor(1.0)) for t in features.normal)
    assert torch.equal(features.normal[0], features.normal[2]) == shared
    assert not torch.allclose(features.normal[0], features.abnormal[0])
    features.normal[1].sum().backward()
    assert prompts.normal_context.grad.abs().sum() > 0
    assert all(p.grad is None for p in clip.parameters())


def test_learned_context_replaces_only_the_placeholders():
    torch.manual_seed(0)
    clip = tiny_clip().eval()
    tokenizer = open_clip.SimpleTokenizer()
    prompts = PromptLearner(clip, tokenizer, num_levels=1, prompt_length=3, normal_template="object.")
    placeholder = tokenizer(["X X X object."])
    with torch.no_grad():  # context = the placeholders' own embeddings -> the plain prompt's features
        prompts.normal_context.copy_(clip.token_embedding(placeholder)[:, 1:4])
        ours = prompts(clip).normal[0]
    assert torch.allclose(ours, clip.encode_text(placeholder, normalize=True)[0], atol=1e-5)


def test_normality_vectors_without_text_tower():
    vectors = NormalityVectors([24, 40], abnormal=False)
    features = vectors()
    assert [t.shape for t in features.normal] == [(24,), (40,)] and features.abnormal is None
    with pytest.raises(ValueError, match="one width"):
        NormalityVectors([24, 40], shared_context=True)


def test_model_text_features_are_stored_as_buffers():
    torch.manual_seed(0)
    model = build_model(ModelConfig(preset="tiny", abnormal_prompt=True), pretrained=False)
    model.store_text_features()
    live = model.text_features()
    stored = model.stored_text_features()
    assert all(torch.allclose(a, b) for a, b in zip(live.normal, stored.normal, strict=True))
    assert all(torch.allclose(a, b) for a, b in zip(live.abnormal, stored.abnormal, strict=True))
    assert "normal_text_0" in model.checkpoint_state_dict()


def test_prompts_run_only_up_to_the_end_of_text_token_with_the_same_features():
    torch.manual_seed(0)
    clip = tiny_clip().eval()
    tokenizer = open_clip.SimpleTokenizer()
    prompts = PromptLearner(clip, tokenizer, num_levels=2, prompt_length=12, abnormal=True)
    assert prompts.normal_tokens.shape[1] == text_prefix_length(clip, tokenizer(["X " * 12 + "object."])) < 77
    full = tokenizer(["X " * 12 + "damaged object."])
    assert prompts.abnormal_tokens.shape[1] == int(full.argmax()) + 1
    with torch.no_grad():
        context = prompts.abnormal_context[0]
        embedded = clip.token_embedding(full)
        embedded = torch.cat([embedded[:, :1], context[None], embedded[:, 13:]], dim=1)  # full 77 positions
        reference = encode_text_embeddings(clip, embedded, full)[0]
        assert torch.allclose(prompts(clip).abnormal[0], reference, atol=1e-5)
