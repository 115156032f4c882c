"""`clipkit train`: typos stop before work; --dry-run prints the plan and the memory estimate."""

from pathlib import Path

from clipkit.cli.main import main

RECIPE = str(Path(__file__).parents[1] / "train" / "tiny_openclip.yaml")


def test_typo_in_override_exits_2_naming_the_key(capsys):
    assert main(["train", RECIPE, "train.sampels=10"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.sampels'; did you mean 'train.samples'" in err


def test_dry_run_prints_config_and_memory_estimate(capsys):
    assert main(["train", RECIPE, "data.batch_size=16", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "batch_size: 16" in out
    assert "predicted peak memory per device" in out and "batch 16 x 1 rank(s)" in out
