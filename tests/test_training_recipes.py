"""The recipes in train/: they load, build, and mean what their comments say."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_helpers import write_shards

from clipkit.config import load_config
from clipkit.models import build_model
from clipkit.training import checkpoint as ckpt
from clipkit.training.feature_cache import why_not_cached
from clipkit.training.loop import train
from clipkit.training.optim import param_groups

RECIPES = sorted((Path(__file__).parent.parent / "train").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_loads(recipe):
    cfg = load_config(recipe)
    assert cfg.train.run_name == recipe.stem
    assert cfg.data.train


def test_lit_emoji_is_lit_with_a_cached_image_tower():
    cfg = load_config(Path(__file__).parent.parent / "train" / "lit_emoji.yaml")
    assert cfg.data.train == "data/emoji/train"  # data_tools/build_emoji.py --out data/emoji
    model = build_model(cfg.model)
    assert why_not_cached(cfg, model) is None
    groups = {g["name"]: g for g in param_groups(model, cfg.model, cfg.optim)}
    assert not any(name.startswith("vision") for name in groups)
    assert groups["text"]["lr"] == pytest.approx(cfg.optim.lr * cfg.model.text.lr_mult)
    assert model.vision_proj.weight.shape == (cfg.model.embed_dim, model.vision.out_dim)


def test_tiny_openclip_trains(tmp_path):
    spec = write_shards(tmp_path / "shards", n_shards=2, per_shard=40)
    overrides = [f"data.train={spec}", "train.samples=96", f"train.output_dir={tmp_path}"]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = train(load_config(Path(__file__).parent.parent / "train" / "tiny_openclip.yaml", overrides))
    finally:
        torch.set_num_threads(before)
    assert ckpt.latest(run_dir).name == "step_00000003.pt"  # 96 samples = 3 steps of 32
