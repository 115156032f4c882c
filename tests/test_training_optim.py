"""AdamW parameter groups and the warmup-cosine schedule, checked against their definitions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from clipkit.config import ModelConfig, OptimConfig, TowerConfig
from clipkit.training.optim import build_optimizer, group_summary, param_groups
from clipkit.training.schedule import build_scheduler, lr_factor


class Toy(nn.Module):
    """The DualEncoder's submodule names around small layers; one frozen vision layer."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.vision = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 6))
        self.text = nn.Sequential(nn.Embedding(10, 5), nn.LayerNorm(5), nn.Linear(5, 6))
        self.vision_proj = nn.Linear(6, 3, bias=bias)
        self.text_proj = nn.Linear(6, 3, bias=bias)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0))
        self.vision[0].requires_grad_(False)  # a locked stem


def cfgs(v_mult: float = 0.1, t_mult: float = 0.5) -> tuple[ModelConfig, OptimConfig]:
    model = ModelConfig(
        vision=TowerConfig(name="x:v", lr_mult=v_mult), text=TowerConfig(name="x:t", lr_mult=t_mult)
    )
    return model, OptimConfig(lr=2e-3, weight_decay=0.2)


def test_groups_split_decay_and_apply_tower_lr_mult():
    model = Toy()
    groups = {g["name"]: g for g in param_groups(model, *cfgs())}
    names = {k: set(g["param_names"]) for k, g in groups.items()}
    assert names == {
        "vision": {"vision.2.weight"},
        "vision_no_decay": {"vision.1.weight", "vision.1.bias", "vision.2.bias"},
        "text": {"text.0.weight", "text.2.weight"},
        "text_no_decay": {"text.1.weight", "text.1.bias", "text.2.bias"},
        "head": {"vision_proj.weight", "text_proj.weight"},
        "head_no_decay": {"vision_proj.bias", "text_proj.bias", "logit_scale", "logit_bias"},
    }
    lrs = {k: g["lr"] for k, g in groups.items()}
    assert lrs["vision"] == lrs["vision_no_decay"] == pytest.approx(2e-4)
    assert lrs["text"] == lrs["text_no_decay"] == pytest.approx(1e-3)
    assert lrs["head"] == lrs["head_no_decay"] == pytest.approx(2e-3)
    for k, g in groups.items():
        assert g["weight_decay"] == (0.0 if k.endswith("_no_decay") else 0.2)
    # Every trainable parameter exactly once; frozen ones never.
    listed = [p for g in groups.values() for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(listed) == len({id(p) for p in listed}) == len(trainable)
    assert not any(p is model.vision[0].weight for p in listed)


def test_adamw_step_decays_only_the_decay_groups():
    # With zero gradients AdamW's only update is decoupled decay: p <- p * (1 - lr * wd).
    torch.manual_seed(0)
    model = Toy()
    model_cfg, optim_cfg = cfgs()
    opt = build_optimizer(model, model_cfg, optim_cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    lr_of = {n: g["lr"] for g in opt.param_groups for n in g["param_names"]}
    decayed = {n for g in opt.param_groups if g["weight_decay"] > 0 for n in g["param_names"]}
    for n, p in model.named_parameters():
        if n in decayed:
            torch.testing.assert_close(p.detach(), before[n] * (1 - lr_of[n] * 0.2))
        else:
            torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)
    assert decayed and all(model.get_parameter(n).ndim >= 2 for n in decayed)


def test_summary_counts_trainable_params():
    model = Toy(bias=False)
    rows = {r["name"]: r for r in group_summary(build_optimizer(model, *cfgs()))}
    assert rows["head"]["params"] == 2 * 6 * 3
    assert rows["head_no_decay"]["params"] == 2  # scale and bias
    assert sum(r["params"] for r in rows.values()) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )


def test_locked_real_model_has_no_tower_group():
    from clipkit.models import build_model

    mcfg = ModelConfig(
        vision=TowerConfig(name="open_clip:clipkit-tiny-ViT", locked=True, image_size=32),
        text=TowerConfig(
            name="open_clip:clipkit-tiny-ViT", locked=True, unlocked_layers=1, context_length=16
        ),
        embed_dim=16,
    )
    model = build_model(mcfg)
    groups = {g["name"]: g for g in param_groups(model, mcfg, OptimConfig())}
    assert "vision" not in groups and "vision_no_decay" not in groups
    assert "logit_scale" in groups["head_no_decay"]["param_names"]
    assert all(
        n.startswith("text.") for n in groups["text"]["param_names"] + groups["text_no_decay"]["param_names"]
    )


def test_no_trainable_params_is_a_clear_error():
    model = Toy()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model, *cfgs())


# ---------------------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.1),  # first update: lr / warmup
        (4, 0.5),
        (9, 1.0),  # last warmup update: full lr
        (10, 1.0),  # cosine starts at the top
        (60, 0.1 + 0.9 * 0.5),  # half way: (1 + cos(pi/2)) / 2 = 0.5
        (35, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25))),
        (110, 0.1),  # end: min_lr_ratio
        (500, 0.1),  # past the end: stays there
    ],
)
def test_lr_factor_known_values(step, expected):
    assert lr_factor(step, warmup=10, total=110, min_ratio=0.1) == pytest.approx(expected)


def test_no_warmup_starts_at_full_lr():
    assert lr_factor(0, warmup=0, total=10, min_ratio=0.0) == 1.0
    assert lr_factor(10, warmup=0, total=10, min_ratio=0.0) == pytest.approx(0.0)


def test_scheduler_follows_formula_per_group_and_resumes():
    model = Toy()
    model_cfg, optim_cfg = cfgs()
    optim_cfg = OptimConfig(lr=2e-3, warmup_steps=5, min_lr_ratio=0.05)
    opt = build_optimizer(model, model_cfg, optim_cfg)
    sched = build_scheduler(opt, optim_cfg, total_steps=40)
    base = [g["initial_lr"] for g in opt.param_groups]  # lr * tower multiplier
    for step in range(25):
        factor = lr_factor(step, 5, 40, 0.05)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * factor for b in base])
        opt.step()
        sched.step()
    saved = sched.state_dict()
    # A fresh optimizer + scheduler restored from the state continues at the same lr.
    opt2 = build_optimizer(model, model_cfg, optim_cfg)
    sched2 = build_scheduler(opt2, optim_cfg, total_steps=40)
    sched2.load_state_dict(saved)
    opt2.load_state_dict(opt.state_dict())
    assert sched2.last_epoch == 25
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx(
        [b * lr_factor(25, 5, 40, 0.05) for b in base]
    )
    opt2.step()
    sched2.step()
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx(
        [b * lr_factor(26, 5, 40, 0.05) for b in base]
    )
