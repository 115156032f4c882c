"""The second half of the objective zoo inside training runs: albef_md's momentum model and queue
checkpointed and restored on resume, distill_kl / dclip with a run folder as teacher, and every
objective's options selectable from a recipe.

The losses' math (loop-by-loop references, hand-worked examples, OpenCLIP parity) is in
test_losses_zoo2.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from training_helpers import tiny_tree, write_shards

from clipkit.config import Config, LossConfig, from_dict, load_config
from clipkit.errors import ClipkitError
from clipkit.losses import build_loss
from clipkit.training import checkpoint as ckpt
from clipkit.training import loop


@pytest.fixture(scope="module")
def albef_run(tmp_path_factory):
    """A tiny LiT run (locked, feature-cached vision tower) with albef_md and a queue of 20."""
    tmp = tmp_path_factory.mktemp("albef")
    shards = write_shards(tmp / "shards", n_shards=3, per_shard=16)
    overrides = {"train.samples": 80, "loss.name": "albef_md", "loss.args": {"queue_size": 20}}
    cfg = from_dict(Config, tiny_tree(shards, tmp / "runs", **overrides))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return shards, tmp, cfg, loop.train(cfg)
    finally:
        torch.set_num_threads(before)


def test_albef_md_run_checkpoints_its_momentum_model_and_queue(albef_run):
    *_, run_dir = albef_run
    first, last = (ckpt.load(p) for p in ckpt.list_checkpoints(run_dir))  # steps 5 and 10
    assert (first["step"], last["step"]) == (5, 10)
    for state in (first, last):
        extra = state["loss"]["_extra_state"]
        assert extra["queue_img"].shape == extra["queue_txt"].shape == (20, 16)  # 40 > 20 seen: full
        assert set(extra["ema"]) == set(state["trainable"])
        for name, p in state["trainable"].items():  # an EMA: near the weights, lagging behind them
            assert not torch.equal(extra["ema"][name], p), name
    moved = [
        n
        for n in last["trainable"]
        if not torch.equal(first["loss"]["_extra_state"]["ema"][n], last["loss"]["_extra_state"]["ema"][n])
    ]
    assert moved == list(last["trainable"])  # after_step ran every step


def test_albef_md_resume_restores_the_ema_and_queue(albef_run, monkeypatch):
    shards, tmp, _, run_dir = albef_run
    step5 = ckpt.list_checkpoints(run_dir)[0]
    overrides = {
        "train.samples": 80, "loss.name": "albef_md", "loss.args": {"queue_size": 20},
        "train.run_name": "resumed", "train.resume": str(step5),
    }  # fmt: skip
    restored = {}
    real_restore = loop.restore

    def spy(run, state):
        real_restore(run, state)
        restored.update(copy.deepcopy(run.loss_fn.get_extra_state()))

    monkeypatch.setattr(loop, "restore", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loop.train(from_dict(Config, tiny_tree(shards, tmp / "runs", **overrides)))
    finally:
        torch.set_num_threads(before)
    want = ckpt.load(step5)["loss"]["_extra_state"]
    torch.testing.assert_close(restored["queue_img"], want["queue_img"])
    torch.testing.assert_close(restored["queue_txt"], want["queue_txt"])
    for name, t in want["ema"].items():
        torch.testing.assert_close(restored["ema"][name], t, rtol=0, atol=0)


def test_distill_from_a_run_folder_teacher(albef_run):
    shards, tmp, _, teacher_dir = albef_run
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ("distill_kl", "dclip"):
            overrides = {"train.samples": 16, "loss.name": name, "loss.args": {"teacher": str(teacher_dir)},
                         "train.run_name": f"student_{name}"}  # fmt: skip
            run_dir = loop.train(from_dict(Config, tiny_tree(shards, tmp / "runs", **overrides)))
            state = ckpt.load(ckpt.latest(run_dir))
            assert state["step"] == 2 and not any("teacher" in k for k in state["loss"])
        # Another seed: another (random) locked vision tower, whose cached features the teacher cannot read.
        overrides = {"train.samples": 16, "loss.name": "dclip", "loss.args": {"teacher": str(teacher_dir)},
                     "train.run_name": "other_tower", "train.seed": 1}  # fmt: skip
        with pytest.raises(ClipkitError, match="train.feature_cache=false"):
            loop.train(from_dict(Config, tiny_tree(shards, tmp / "runs", **overrides)))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "overrides,attr,value",
    [
        (["loss.name=albef_md", "loss.args.alpha=0.3", "loss.args.queue_size=64"], "queue_size", 64),
        (["loss.name=mochi", "loss.args.num_hard=8"], "num_hard", 8),
        (["loss.name=m3col", "loss.args.modality=both"], "modality", "both"),
        (
            ["loss.name=distill_kl", "loss.args.teacher=null", "loss.args.distill_weight=2"],
            "distill_weight",
            2,
        ),
        (["loss.name=dclip", "loss.args.teacher=null", "loss.args.weight=0.5"], "weight", 0.5),
    ],
)
def test_selectable_from_a_recipe(overrides, attr, value):
    loss = build_loss(
        load_config(Path(__file__).parent.parent / "train" / "tiny_openclip.yaml", overrides).loss
    )
    assert getattr(loss, attr) == value
    with pytest.raises(TypeError, match="needs option 'teacher'"):
        build_loss(LossConfig(name="dclip"))
    with pytest.raises(TypeError, match="did you mean 'queue_size'"):
        build_loss(LossConfig(name="albef_md", args={"queue_sise": 3}))
