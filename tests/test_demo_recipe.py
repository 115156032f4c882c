"""``clipkit demo --recipe``: which bundled sources a recipe needs, and where --data moves them."""

from __future__ import annotations

from pathlib import Path

from clipkit.cli.demo import REPO, recipe_sources, relocate
from clipkit.config import load_config


def test_the_mixture_recipe_needs_emoji_and_openclipart():
    cfg = load_config(REPO / "train" / "lit_mix.yaml")
    assert recipe_sources(cfg) == ["emoji", "openclipart"]
    assert cfg.data.resampled and len(cfg.data.train_weights) == 2 and cfg.data.caption_templates
    assert recipe_sources(load_config(REPO / "train" / "lit_emoji.yaml")) == ["emoji"]
    mine = load_config(
        None, ["data.train=/elsewhere/shards::data/animal_mnist/test", "data.val=data/mine/val"]
    )
    assert recipe_sources(mine) == ["animal-mnist"]  # user folders are not built


def test_relocate_moves_only_the_data_folder():
    spec = "data/emoji/train::data/openclipart/train:: /abs/x.tar"
    assert relocate(spec, Path("/tmp/d")) == "/tmp/d/emoji/train::/tmp/d/openclipart/train::/abs/x.tar"
    assert relocate("", Path("/tmp/d")) == ""
