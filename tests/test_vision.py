"""The EVA vision tower's helpers (wegen.vision): token pooling and image preprocessing."""
import pytest
import torch

from wegen import vision


def test_eva_pooling_shapes_and_values(engine):
    tokens = torch.randn(2, 1024, 112)
    pooled = vision.avg_pool_tokens(tokens, 64)
    assert pooled.shape == (2, 64, 112)
    grid = tokens.view(2, 32, 32, 112)
    torch.testing.assert_close(pooled[:, 0], grid[:, :4, :4].mean(dim=(1, 2)))
    torch.testing.assert_close(pooled[:, 9], grid[:, 4:8, 4:8].mean(dim=(1, 2)))
    assert vision.avg_pool_tokens(pooled, 64).shape == (2, 64, 112)  # 64 tokens: stride 1, unchanged
    feats = engine.encode_images(torch.rand(3, 30, 50, 3))
    assert feats.shape == (3, 64, 112) and feats.dtype == torch.float32
    with pytest.raises(AssertionError, match="square grid"):
        vision.avg_pool_tokens(torch.randn(1, 1000, 8), 64)


def test_preprocess_resizes_to_448_and_normalises():
    x = vision.preprocess(torch.ones(1, 20, 30, 3) * 0.5)
    assert x.shape == (1, 3, 448, 448)
    torch.testing.assert_close(x[0, 0, 0, 0], torch.tensor((0.5 - 0.48145466) / 0.26862954))
