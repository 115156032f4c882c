"""The registry of bundled-source builders (clipkit.data.builders) and ``clipkit data build NAME``."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data_tools
from clipkit.cli.main import main as cli
from clipkit.data.builders import BUILDERS

REPO = Path(__file__).resolve().parents[1]
data_tools.load_builders()


def test_every_builder_module_registers_its_build_function():
    from data_tools import (
        build_animal_mnist,
        build_emoji,
        build_glyphs,
        build_ood_digits,
        build_ood_icons,
        build_openclipart,
    )

    assert BUILDERS.names() == ["animal-mnist", "emoji", "glyphs", "ood-digits", "ood-icons", "openclipart"]
    assert BUILDERS.get("emoji") is build_emoji.build
    assert BUILDERS.get("animal-mnist") is build_animal_mnist.build
    assert BUILDERS.get("glyphs") is build_glyphs.build
    assert BUILDERS.get("openclipart") is build_openclipart.build
    assert BUILDERS.get("ood-digits") is build_ood_digits.build
    assert BUILDERS.get("ood-icons") is build_ood_icons.build


@pytest.mark.parametrize("name", BUILDERS.names())
def test_builder_contract(name):
    """Called as build(out_dir) by the CLI: one required parameter, the rest have defaults."""
    params = list(inspect.signature(BUILDERS.get(name)).parameters.values())
    assert params[0].name == "out_dir"
    assert all(p.default is not p.empty for p in params[1:])


def test_cli_runs_whatever_is_registered(tmp_path, capsys, monkeypatch):
    calls = []

    def tiny(out_dir):
        calls.append(out_dir)
        return {"train": 3}

    monkeypatch.setitem(BUILDERS._items, "tiny-source", tiny)  # a new source is one registered function
    assert cli(["data", "build", "tiny-source", "--out", str(tmp_path / "o")]) == 0
    assert calls == [str(tmp_path / "o")]
    out = json.loads(capsys.readouterr().out)
    assert out == {"source": "tiny-source", "out": str(tmp_path / "o"), "counts": {"train": 3}}


def test_unknown_builder_suggests_the_nearest(tmp_path, capsys):
    assert cli(["data", "build", "emoj", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a folder, a file or a bundled source" in err
    assert (
        "did you mean 'emoji'? known: animal-mnist, emoji, glyphs, ood-digits, ood-icons, openclipart" in err
    )
    assert not (tmp_path / "o").exists()


def test_bundled_source_refuses_build_options(tmp_path, capsys):
    assert cli(["data", "build", "emoji", "--out", str(tmp_path / "o"), "--threads", "2"]) == 2
    assert "bundled source 'emoji' takes only --out, not --threads" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_path_named_like_a_builder_is_a_path(tmp_path, capsys, monkeypatch):
    (tmp_path / "emoji").mkdir()  # an (empty) image folder called emoji, not the bundled source
    monkeypatch.chdir(tmp_path)
    assert cli(["data", "build", "emoji", "--out", str(tmp_path / "o")]) == 2
    assert "holds no images" in capsys.readouterr().err


def test_builder_modules_still_run_as_scripts():
    """``python -m data_tools.build_x`` imports the package first: it must not register x twice."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for module in ("build_emoji", "build_animal_mnist", "build_openclipart"):
        run = subprocess.run(
            [sys.executable, "-m", f"data_tools.{module}", "--help"],
            check=False,
            cwd=REPO,
            env=env,
            capture_output=True,
        )
        assert run.returncode == 0 and b"--out" in run.stdout, run.stderr.decode()[-2000:]
