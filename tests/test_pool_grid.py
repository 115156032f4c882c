"""model.vision.pool_grid: a timm tower's last feature map pooled over a g x g grid.

Oracles: a naive loop over the cells adaptive pooling defines (rows floor(i*H/g) .. ceil((i+1)*H/g));
on a map whose sides divide by g, the mean of the g*g cells is the global average pool the tower
gives with pool_grid=1. The feature cache stores the grid features under a fingerprint of their own.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from training_helpers import tiny_tree, write_shards

from clipkit.config import Config, TowerConfig, from_dict, load_config
from clipkit.models import build_model
from clipkit.models.towers import build_tower
from clipkit.models.towers_timm import grid_pool
from clipkit.training import feature_cache

EFFNET = {"name": "timm:tf_efficientnet_lite0", "weights": "bundled", "locked": True}


def naive_grid_pool(x: torch.Tensor, g: int) -> torch.Tensor:
    b, c, h, w = x.shape
    out = torch.empty(b, c, g, g, dtype=torch.float64)
    for i in range(g):
        r0, r1 = (i * h) // g, math.ceil((i + 1) * h / g)
        for j in range(g):
            c0, c1 = (j * w) // g, math.ceil((j + 1) * w / g)
            out[:, :, i, j] = x[:, :, r0:r1, c0:c1].double().mean((2, 3))
    return out.flatten(1)


@pytest.mark.parametrize(
    "shape,g", [((2, 3, 5, 5), 2), ((2, 4, 4, 6), 2), ((1, 2, 7, 5), 3), ((2, 3, 5, 5), 1)]
)
def test_grid_pool_is_the_mean_over_each_cell(shape, g):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    got = grid_pool(x, g)
    assert got.shape == (shape[0], shape[1] * g * g)
    torch.testing.assert_close(got.double(), naive_grid_pool(x, g), rtol=0, atol=1e-6)


def test_the_tower_pools_its_last_map_over_the_grid():
    torch.manual_seed(0)
    flat = build_tower(TowerConfig(**EFFNET, image_size=128), "vision").eval()
    grid = build_tower(TowerConfig(**EFFNET, image_size=128, pool_grid=2), "vision").eval()
    assert grid.out_dim == 4 * flat.out_dim == 4 * 1280
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        fmap = flat.model.forward_features(x)  # (2, 1280, 4, 4) at 128 px
        got, pooled = grid(x), flat(x)
    assert fmap.shape[-2:] == (4, 4)
    torch.testing.assert_close(got.double(), naive_grid_pool(fmap, 2), rtol=0, atol=1e-5)
    # the four cells tile a 4x4 map: their mean is the global average pool
    torch.testing.assert_close(got.view(2, 1280, 4).mean(-1), pooled, rtol=0, atol=1e-5)
    assert not torch.allclose(got.view(2, 1280, 4)[..., 0], pooled, atol=1e-3)  # cells differ


def test_the_fingerprint_follows_the_grid_and_stays_for_global_pooling():
    flat = build_tower(TowerConfig(**EFFNET, image_size=64), "vision")
    grid = build_tower(TowerConfig(**EFFNET, image_size=64, pool_grid=2), "vision")
    grid3 = build_tower(TowerConfig(**EFFNET, image_size=64, pool_grid=3), "vision")
    assert len({flat.fingerprint(), grid.fingerprint(), grid3.fingerprint()}) == 3
    assert "pool_grid" not in flat._fingerprint_extra  # caches filled before pool_grid keep their key


@pytest.mark.parametrize(
    "cfg,modality",
    [
        (TowerConfig(name="hf:minilm", weights="bundled", pool_grid=2), "text"),
        (TowerConfig(name="open_clip:clipkit-tiny-ViT", image_size=32, pool_grid=2), "vision"),
    ],
)
def test_a_tower_without_a_feature_map_refuses_a_grid(cfg, modality):
    with pytest.raises(ValueError, match=f"'{cfg.name}': pool_grid=2 .*only timm image towers"):
        build_tower(cfg, modality)


def test_a_grid_below_one_is_refused():
    with pytest.raises(ValueError, match="pool_grid must be >= 1, got 0"):
        build_tower(TowerConfig(**EFFNET, image_size=64, pool_grid=0), "vision")


def test_the_demo_recipe_takes_it_as_an_override():
    cfg = load_config("train/lit_mix.yaml", ["model.vision.pool_grid=2", "model.vision.image_size=64"])
    model = build_model(cfg.model)
    assert model.vision.out_dim == 5120 and model.vision_proj.in_features == 5120


def test_training_caches_the_grid_features(tmp_path):
    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=16)
    trees = {
        g: tiny_tree(
            shards,
            tmp_path / f"runs{g}",
            **{
                "model.vision": {**EFFNET, "image_size": 64, "pool_grid": g},
                "train.samples": 32,
                "train.threads": 1,
            },
        )
        for g in (1, 2)
    }
    from clipkit.training import loop

    for tree in trees.values():
        loop.train(from_dict(Config, tree))
    folders = sorted((tmp_path / "shards" / feature_cache.CACHE_DIRNAME).iterdir())
    assert len(folders) == 2  # one cache per pooling
    widths = sorted(np.load(next(f.glob("features-*.npy"))).shape[1] for f in folders)
    assert widths == [1280, 5120]
