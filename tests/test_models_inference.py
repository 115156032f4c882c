"""Bulk inference layout: channels-last (and bf16) tower passes agree with the plain pass."""

from __future__ import annotations

import pytest
import torch

from clipkit.config import TowerConfig
from clipkit.models.inference import bulk_inference
from clipkit.models.towers import build_tower


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    t = build_tower(
        TowerConfig(name="timm:tf_efficientnet_lite0", weights="bundled", image_size=64), "vision"
    )
    return t.eval()


def test_channels_last_pass_matches_and_restores_the_layout(tower):
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        ref = tower(x)
    with torch.inference_mode(), bulk_inference(tower) as prep:
        xx = prep(x)
        assert xx.is_contiguous(memory_format=torch.channels_last)
        fast = tower(xx)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    weights = [p for p in tower.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous() for p in weights)  # layout restored
    assert not any(p.is_inference() for p in tower.parameters())  # still trainable tensors


def test_bf16_pass_is_close_and_bad_precision_is_refused(tower):
    x = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        ref = tower(x)
        with bulk_inference(tower, "bf16") as prep:
            fast = tower(prep(x)).float()
    cos = torch.nn.functional.cosine_similarity(fast, ref, dim=-1)
    assert cos.min() > 0.99 and not torch.equal(fast, ref)
    with pytest.raises(ValueError, match="precision"), bulk_inference(tower, "fp16"):
        pass
