"""End-to-end training on tiny shards: budget met exactly, run folder complete, kill + resume."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from training_helpers import tiny_tree, write_shards

from clipkit.config import Config, from_dict, load_config
from clipkit.errors import ClipkitError
from clipkit.training import checkpoint as ckpt
from clipkit.training.loop import train
from clipkit.training.schedule import lr_factor

HERE = Path(__file__).parent
# 3 shards x 16 samples = 6 batches of 8 per epoch; 100 samples = 12 full steps + one of 4.
SAMPLES, STEPS = 100, 13


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=3, per_shard=16)


def config(shards: str, out: Path, **overrides) -> Config:
    return from_dict(Config, tiny_tree(shards, out, **{"train.samples": SAMPLES, **overrides}))


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def final(run_dir: Path) -> dict:
    return json.loads(ckpt.sidecar_path(ckpt.latest(run_dir)).read_text())


@pytest.fixture(scope="module")
def tiny_run(shards, tmp_path_factory) -> tuple[Config, Path]:
    cfg = config(shards, tmp_path_factory.mktemp("runs"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cfg, train(cfg)
    finally:
        torch.set_num_threads(before)


def test_run_meets_budget_exactly_and_fills_run_folder(tiny_run, shards):
    cfg, run_dir = tiny_run
    assert run_dir == Path(cfg.train.output_dir) / "run"
    assert load_config(run_dir / "config.yaml") == cfg
    assert final(run_dir)["step"] == STEPS and final(run_dir)["samples_seen"] == SAMPLES
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step_00000010.pt", "step_00000013.pt"]
    table = rows(run_dir)
    assert [int(r["step"]) for r in table] == [4, 8, 12, 13]
    last = table[-1]
    assert int(last["samples_seen"]) == SAMPLES and int(last["epoch"]) == 2  # 100 samples = 2 epochs + 4
    for col in (
        "lr",
        "loss",
        "loss_i2t",
        "loss_t2i",
        "logit_scale",
        "samples_per_s",
        "align",
        "modality_gap",
    ):
        assert last[col] not in ("", "nan"), col
    assert last["skipped_total"] == "0"
    # lr logged after step 4 = lr for the 5th update: factor(4) with 3 warmup and 13 steps.
    assert float(table[0]["lr"]) == pytest.approx(cfg.optim.lr * lr_factor(4, 3, STEPS, 0.0))
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((run_dir / "tb").glob("events.out.tfevents.*"))
    assert any((Path(shards).parent / "_clipkit_cache").iterdir())  # the locked vision tower was cached


def test_checkpoint_holds_the_whole_state(tiny_run):
    _cfg, run_dir = tiny_run
    state = ckpt.load(ckpt.latest(run_dir))
    assert state["step"] == STEPS and state["samples_seen"] == SAMPLES and state["epoch"] == 2
    assert state["scheduler"]["last_epoch"] == STEPS
    assert state["config"] == json.loads(json.dumps(state["config"]))  # plain data only
    trainable = set(state["trainable"])
    assert trainable and trainable < set(state["model"])
    assert not any(k.startswith("vision.") for k in trainable)  # the locked tower
    assert {"python", "numpy", "torch"} <= set(state["rng"][0])
    assert len(state["optimizer"]["state"]) == len(trainable)


def test_accumulation_bf16_without_cache_meets_budget(shards, tmp_path):
    overrides = {"optim.accum_steps": 2, "train.feature_cache": False, "train.log_every": 3}
    cfg = config(shards, tmp_path, **overrides, **{"train.precision": "bf16"})
    run_dir = train(cfg)
    # 16 samples per step: 6 full steps, then one micro-batch cut to 4 samples.
    assert final(run_dir)["step"] == 7 and final(run_dir)["samples_seen"] == SAMPLES
    assert [int(r["step"]) for r in rows(run_dir)] == [3, 6, 7]


def test_resume_needs_run_name_and_fresh_run_needs_fresh_folder(shards, tmp_path, tiny_run):
    with pytest.raises(ClipkitError, match="train.run_name must be set"):
        train(config(shards, tmp_path, **{"train.resume": "latest", "train.run_name": ""}))
    cfg, _run_dir = tiny_run
    with pytest.raises(ClipkitError, match="already holds a run; continue it with train.resume=latest"):
        train(cfg)


def test_resume_into_another_architecture_is_refused(tiny_run, tmp_path):
    cfg, run_dir = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    tree = json.loads(json.dumps(tiny_tree(cfg.data.train, tmp_path)))
    tree["model"]["embed_dim"] = 24
    tree["train"]["resume"] = "latest"
    with pytest.raises(
        ckpt.CheckpointError, match=r"vision_proj\.weight: checkpoint \(16, 32\) vs model \(24, 32\)"
    ):
        train(from_dict(Config, tree))


def test_killed_run_resumes_to_the_same_end(shards, tmp_path, tiny_run):
    _, full_dir = tiny_run
    cfg = config(shards, tmp_path, **{"train.run_name": "killed"})
    recipe = tmp_path / "killed.json"
    recipe.write_text(
        json.dumps(tiny_tree(shards, tmp_path, **{"train.samples": SAMPLES, "train.run_name": "killed"}))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "training_helpers.py"), str(recipe), "0.4"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    run_dir = tmp_path / "killed"
    deadline = time.time() + 120
    while not list(ckpt.checkpoint_dir(run_dir).glob("*.json")) if run_dir.exists() else True:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    killed_at = final(run_dir)["step"]
    assert 0 < killed_at < STEPS
    twin = tmp_path / "twin"
    shutil.copytree(run_dir, twin)

    resumed = train(config(shards, tmp_path, **{"train.run_name": "killed", "train.resume": "latest"}))
    assert resumed == run_dir
    assert final(run_dir)["step"] == final(full_dir)["step"] == STEPS
    assert final(run_dir)["samples_seen"] == final(full_dir)["samples_seen"] == SAMPLES
    steps = [int(r["step"]) for r in rows(run_dir)]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # rows past the checkpoint were dropped

    # The continuation is deterministic: resuming the same checkpoint again gives the same weights.
    train(config(shards, tmp_path, **{"train.run_name": "twin", "train.resume": "latest"}))
    a = ckpt.load(ckpt.latest(run_dir))["model"]
    b = ckpt.load(ckpt.latest(twin))["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert cfg.train.run_name == "killed"
