"""Config tree: YAML + dotted overrides, loud failure on typos and wrong types."""

import dataclasses
import math

import pytest
import yaml

from clipkit.config import Config, ConfigError, load_config, replace, save_config, to_dict


def test_defaults_are_frozen_and_typed():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.init_logit_scale == pytest.approx(math.log(1 / 0.07))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.samples = 5  # frozen


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"train": {"samples": 100, "seed": 3}, "loss": {"name": "siglip"}}))
    cfg = load_config(recipe, ["train.samples=250", "model.vision.locked=true", "loss.args.x=1.5"])
    assert cfg.train.samples == 250 and cfg.train.seed == 3
    assert cfg.model.vision.locked is True
    assert cfg.loss.name == "siglip" and cfg.loss.args == {"x": 1.5}
    assert isinstance(cfg.optim.lr, float)


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train\.sampels'; did you mean 'train\.samples'"
    ):
        load_config(None, ["train.sampels=3"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  vison:\n    locked: true\n")
    with pytest.raises(ConfigError, match=r"'model\.vison'; did you mean 'model\.vision'"):
        load_config(recipe)


@pytest.mark.parametrize(
    "override, words",
    [
        ("train.samples=many", "train.samples' must be int"),
        ("train.samples=1.5", "train.samples' must be int"),
        ("optim.lr=fast", "optim.lr' must be float"),
        ("model.vision.locked=3", "locked' must be bool"),
        ("train.precision=fp8", "one of 'fp32', 'bf16', 'fp16'"),  # fp16 is valid since #13
        ("model.projection=conv", "one of 'linear', 'mlp', 'none'"),
        ("data.on_error=ignore", "one of 'skip', 'raise'"),
        ("model=3", "'model' must be a mapping"),
        ("nokeyvalue", "not of the form key=value"),
    ],
)
def test_wrong_types_fail_before_work(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert words in str(err.value)


def test_missing_recipe_is_clear():
    with pytest.raises(ConfigError, match="recipe 'nope.yaml' not found"):
        load_config("nope.yaml")


def test_roundtrip_through_saved_yaml(tmp_path):
    cfg = load_config(None, ["train.samples=77", "model.init_logit_bias=-10", "loss.args.a=1"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert replace(cfg, **{"train.seed": 9}).train.seed == 9
    assert to_dict(cfg)["model"]["init_logit_bias"] == -10.0


def test_every_shipped_recipe_loads():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "train").glob("*.yaml"))
    assert recipes, "no recipes in train/"
    for recipe in recipes:
        load_config(recipe)


def test_partial_section_keeps_enclosing_defaults():
    cfg = load_config(None, ["model.vision.locked=true"])
    assert cfg.model.vision.name == Config().model.vision.name != ""
    assert cfg.model.vision.locked is True
    assert cfg.model.text == Config().model.text


def test_exponent_floats_without_a_dot_are_floats():
    # PyYAML (YAML 1.1) parses "1e-6" as a string; users type it all the time.
    cfg = load_config(None, ["optim.eps=1e-6", "optim.lr=3e-4"])
    assert cfg.optim.eps == 1e-6 and cfg.optim.lr == 3e-4
    with pytest.raises(ConfigError, match="optim.eps' must be float"):
        load_config(None, ["optim.eps=tiny"])
