"""The live-bytes counter, the peak-memory estimate against a measured step, the batch search."""

from __future__ import annotations

import pytest
import torch

from clipkit.config import Config, from_dict
from clipkit.errors import ClipkitError
from clipkit.training.memory import (
    LiveBytes,
    MemoryModel,
    estimate_peak_memory,
    find_batch_size,
    format_estimate,
    measure_step,
)

MiB = 2**20


def tiny_cfg(**loss) -> Config:
    """A 2-layer open_clip ViT + text transformer (random init), 32 px, context 16."""
    tower = {"name": "open_clip:clipkit-tiny-ViT", "weights": "", "image_size": 32, "context_length": 16}
    tree = {
        "model": {
            "vision": tower,
            "text": tower,
            "embed_dim": 32,
            "projection": "none",
            "init_logit_bias": -10.0,
        },
        "data": {"batch_size": 64},
        "loss": loss or {"name": "clip"},
    }
    return from_dict(Config, tree)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    from clipkit.models import build_model

    torch.manual_seed(0)
    return build_model(tiny_cfg().model)


def test_live_bytes_counts_storages_once_and_frees_them():
    before = torch.zeros(1000)  # made outside: not counted
    with LiveBytes() as mem:
        a = torch.zeros(250)  # 1000 bytes
        view = a[10:]  # same storage
        a.add_(1)  # in place
        b = a * 2  # 1000 more
        assert mem.live == 2000
        del b
        assert mem.live == 1000
        del a
        assert mem.live == 1000  # the view keeps the storage alive
        del view
        assert mem.live == 0
        (before + 1).sum()  # 4000 bytes, then the 4-byte sum while they are alive
    assert mem.peak == 4004


def test_estimate_parts_and_format(model):
    est = estimate_peak_memory(tiny_cfg(), model=model)
    parts = est["parts"]
    assert est["total"] == sum(parts.values())
    n_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert parts["gradients"] == n_bytes and parts["optimizer"] == 2 * n_bytes
    assert parts["activations"] > 0 and parts["loss"] > 0 and parts["ddp_buckets"] == 0
    text = format_estimate(est)
    assert text.startswith("predicted peak memory per device:") and "activations" in text


def test_gradient_caching_and_tiling_bound_what_grows_with_the_batch(model):
    dense = MemoryModel.measure(tiny_cfg(), model=model)
    tiled = MemoryModel.measure(
        tiny_cfg(name="clip_tiled", args={"memory_budget_mb": 4}), micro_batch=32, model=model
    )
    big, huge = 8192, 32768
    # dense: the (N, N) logits dominate and grow 16x for 4x the batch
    assert dense.predict(huge)["parts"]["loss"] > 12 * dense.predict(big)["parts"]["loss"]
    # tiled + cached: activations fixed by the micro-batch, the loss linear in N
    t_big, t_huge = tiled.predict(big)["parts"], tiled.predict(huge)["parts"]
    assert t_big["activations"] == t_huge["activations"] == 32 * tiled.activation_per_sample
    assert t_huge["loss"] < 4.5 * t_big["loss"]
    assert tiled.predict(huge)["tile"] == 512


def test_several_ranks_add_buckets_and_the_gathered_batch(model):
    one = MemoryModel.measure(tiny_cfg(name="siglip"), model=model)
    four = MemoryModel.measure(tiny_cfg(name="siglip"), world_size=4, model=model)
    p1, p4 = one.predict(64)["parts"], four.predict(64)["parts"]
    assert p4["ddp_buckets"] == p1["gradients"]
    assert p4["embeddings"] == 4 * 4 * (4 * 64) * 32
    assert p1["loss"] < p4["loss"] < 4 * 4 * p1["loss"]  # siglip scores local rows: B x N, not N x N


@pytest.mark.parametrize(
    "loss,micro", [({"name": "clip"}, None), ({"name": "clip_tiled", "args": {"tile_size": 64}}, 64)]
)
def test_prediction_is_close_to_a_measured_step(model, loss, micro):
    cfg = tiny_cfg(**loss)
    predicted = MemoryModel.measure(cfg, micro_batch=micro, model=model).predict(256)["total"]
    measured = measure_step(cfg, 256, micro)
    assert 0.7 * measured <= predicted <= 1.4 * measured, (predicted / MiB, measured / MiB)


def test_find_batch_size_fits_the_budget_and_says_when_nothing_does():
    cfg = tiny_cfg()
    budget = 120 * MiB
    b = find_batch_size(cfg, budget, verify=True, max_batch=4096)
    assert 0.85 * budget <= measure_step(cfg, b, None) <= budget  # fits, and uses most of it
    with pytest.raises(ClipkitError, match="not even a batch of 1 fits"):
        find_batch_size(cfg, 10 * MiB, verify=False)
