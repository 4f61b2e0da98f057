"""The CLIP encoder against a manual pass through the image tower of a tiny random open_clip CLIP: the blocks that
``forward_intermediates`` taps (0-based indices, patch tokens only) and the joint projection ``ln_post @ proj``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cnc_ad.model.encoders import NORMALIZATIONS, CLIPEncoder, tiny_clip


def _manual_pass(clip: torch.nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's output (B, 1 + L, C) of the image tower, written out from the ViT's definition."""
    visual = clip.visual
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATIONS["clip"])
    x = F.conv2d((images - mean) / std, visual.conv1.weight, stride=visual.conv1.stride)  # (B, C, G, G), no bias
    x = x.flatten(2).transpose(1, 2)  # (B, G*G, C), row-major patches
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
    outputs = []
    for block in visual.transformer.resblocks:
        x = block(x)  # batch-first (B, 1 + L, C)
        outputs.append(x)
    return outputs


@pytest.fixture(scope="module")
def clip() -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_clip(image_size=32).eval()
    with torch.no_grad():  # a non-trivial final norm, so that using it (or not) shows
        model.visual.ln_post.weight.uniform_(0.5, 1.5)
        model.visual.ln_post.bias.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize("layers", [(0, 1, 2, 3), (1, 3), (2,)])
def test_taps_are_the_outputs_of_the_chosen_blocks(clip: torch.nn.Module, layers: tuple[int, ...]) -> None:
    encoder = CLIPEncoder(clip, layers)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tapped = encoder(images)
        reference = _manual_pass(clip, images)
    assert encoder.grid_size == 8 and encoder.level_dims == (64,) * len(layers)
    assert len(tapped) == len(layers)
    for level, block in enumerate(layers):
        assert tapped[level].shape == (2, 64, 64)  # (B, L = 8 x 8 patches, C): no class token
        torch.testing.assert_close(tapped[level], reference[block][:, 1:], rtol=1e-5, atol=1e-5)


def test_joint_projection_is_ln_post_then_proj_and_matches_encode_image(clip: torch.nn.Module) -> None:
    encoder = CLIPEncoder(clip, (1, 3))
    visual = clip.visual
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = encoder(images)
        for level, level_tokens in enumerate(tokens):
            ln = visual.ln_post
            expected = F.layer_norm(level_tokens, (64,), ln.weight, ln.bias, ln.eps) @ visual.proj
            joint = encoder.to_joint(level, level_tokens)
            assert joint.shape == (2, 64, encoder.joint_dims[level]) == (2, 64, 32)
            torch.testing.assert_close(joint, expected, rtol=1e-5, atol=1e-5)
        # The same projection of the last block's class token is open_clip's image embedding.
        last_cls = _manual_pass(clip, images)[-1][:, :1]
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATIONS["clip"])
        embedding = clip.encode_image((images - mean) / std)
    torch.testing.assert_close(encoder.to_joint(1, last_cls)[:, 0], embedding, rtol=1e-5, atol=1e-5)


def test_layers_must_be_blocks_of_the_tower(clip: torch.nn.Module) -> None:
    for layers in ((), (4,), (-1, 2)):
        with pytest.raises(ValueError, match="0-based blocks"):
            CLIPEncoder(clip, layers)
