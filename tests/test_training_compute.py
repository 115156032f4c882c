"""Gradient checkpointing (every tower kind) and torch.compile (``train.compile``): the same
numbers as the plain model, with less memory kept for the backward / through a compiled graph."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from training_helpers import tiny_tree, write_shards

from clipkit.config import Config, TowerConfig, from_dict
from clipkit.errors import ClipkitError
from clipkit.models import TOWERS, build_tower
from clipkit.training import checkpoint as ckpt
from clipkit.training import loop

pytestmark = pytest.mark.usefixtures("one_thread")

# Towers whose backbone has no checkpointing: they must refuse, naming themselves.
NO_CHECKPOINTING = {"open_clip:clipkit-tiny-RN"}

EXAMPLES = [
    pytest.param(modality, kwargs, id=f"{kwargs['name']}-{modality}")
    for prefix in TOWERS.names()
    for modality, kwargs in TOWERS.get(prefix).examples
]


def tower_input(tower, cfg: TowerConfig) -> torch.Tensor:
    if tower.modality == "vision":
        return torch.randn(3, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
    return tower.tokenize(["a red cat", "two small dogs on the grass", "sun"])


def grads_and_saved_bytes(tower, x: torch.Tensor, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """Parameter gradients of ``sum(tower(x) * w)`` and the bytes autograd saved for the backward
    outside checkpointed regions (a checkpointed block keeps only its input)."""
    tower.zero_grad(set_to_none=True)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    torch.manual_seed(1)  # the same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = tower(x)  # (B, out_dim)
    (out * w).sum().backward()
    return {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}, saved


@pytest.mark.parametrize("locked", [False, True], ids=["trainable", "locked-top-unlocked"])
@pytest.mark.parametrize("modality,kwargs", EXAMPLES)
def test_grad_checkpointing_gives_the_same_gradients_and_keeps_less(modality, kwargs, locked):
    # locked: the top block and the head train, on the output of frozen blocks
    cfg = TowerConfig(**kwargs, locked=locked, unlocked_layers=2 if locked else 0)
    torch.manual_seed(0)
    tower = build_tower(cfg, modality).train()
    if getattr(tower, "packed", False):
        # Checkpointing runs Hugging Face's own forward (clipkit.models.packed_hf); the plain run
        # does too, so both draw the same dropout masks.
        tower.packed = False
    x = tower_input(tower, cfg)
    w = torch.randn(x.shape[0], tower.out_dim, generator=torch.Generator().manual_seed(2))
    plain, plain_bytes = grads_and_saved_bytes(tower, x, w)
    if cfg.name in NO_CHECKPOINTING:
        with pytest.raises(
            ValueError, match=rf"{modality} tower {cfg.name} \(\w+\) does not support gradient"
        ):
            tower.set_grad_checkpointing(True)
        return
    tower.set_grad_checkpointing(True)
    ckpt_grads, ckpt_bytes = grads_and_saved_bytes(tower, x, w)
    # Every trainable parameter still gets its gradient (a re-entrant checkpoint above frozen
    # layers would leave the top block's gradients None), equal within 1e-6.
    assert plain and ckpt_grads.keys() == plain.keys()
    for name, g in plain.items():
        torch.testing.assert_close(ckpt_grads[name], g, rtol=1e-6, atol=1e-6, msg=name)
    if not locked:  # all blocks trainable: checkpointing must actually drop activations
        assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)


# ---------------------------------------------------------------------------- in the loop


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=4, per_shard=12)


def run(shards: str, out: Path, name: str, **overrides) -> Path:
    tree = tiny_tree(shards, out, **{"train.samples": 64, "train.run_name": name, **overrides})
    # Both towers trainable in their top blocks, images through the vision tower (no cache).
    tree["model"]["vision"].update(locked=True, unlocked_layers=2)
    return loop.train(from_dict(Config, tree))


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load(ckpt.latest(run_dir))["model"]


def assert_weights_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=tol, atol=tol, msg=k)


@pytest.fixture(scope="module")
def eager(shards, tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return run(shards, tmp_path_factory.mktemp("eager"), "eager")


def test_grad_checkpointing_in_the_loop_trains_the_same_model(shards, eager, tmp_path, capsys):
    run_dir = run(shards, tmp_path, "gc", **{"train.grad_checkpointing": True})
    plan = capsys.readouterr().out
    assert "gradient checkpointing: vision tower open_clip:clipkit-tiny-ViT: on; text tower" in plan
    assert losses(run_dir) == pytest.approx(losses(eager), rel=1e-6)
    assert_weights_close(final_weights(run_dir), final_weights(eager), 1e-6)


def test_grad_checkpointing_on_a_tower_without_it_fails_before_training(shards, tmp_path):
    tree = tiny_tree(shards, tmp_path, **{"train.grad_checkpointing": True})
    tree["model"]["vision"] = {"name": "open_clip:clipkit-tiny-RN", "weights": "", "image_size": 64}
    with pytest.raises(
        ClipkitError, match="vision tower open_clip:clipkit-tiny-RN .* gradient checkpointing"
    ):
        loop.train(from_dict(Config, tree))
    assert not (tmp_path / "run" / "metrics.csv").exists()


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compile_trains_the_same_model_as_eager(shards, eager, tmp_path):
    # aot_eager: dynamo's graph capture and AOT autograd (the path inductor compiles), without
    # code generation, which takes a minute on a small CPU; inductor itself: the slow test below.
    before = compiled_graphs()
    run_dir = run(
        shards, tmp_path, "compiled", **{"train.compile": True, "train.compile_backend": "aot_eager"}
    )
    assert compiled_graphs() > before  # the forward really went through torch.compile
    assert losses(run_dir) == pytest.approx(losses(eager), rel=1e-4)
    assert_weights_close(final_weights(run_dir), final_weights(eager), 1e-4)
    assert ckpt.load(ckpt.latest(run_dir))["model"].keys() == final_weights(eager).keys()  # no _orig_mod.


@pytest.mark.slow
def test_compile_with_inductor_trains_the_same_model_as_eager(shards, eager, tmp_path):
    run_dir = run(shards, tmp_path, "inductor", **{"train.compile": True})
    assert losses(run_dir) == pytest.approx(losses(eager), rel=1e-4)
    assert_weights_close(final_weights(run_dir), final_weights(eager), 1e-4)


def test_unknown_compile_backend_is_refused_naming_the_key(shards, tmp_path):
    cfg = from_dict(
        Config, tiny_tree(shards, tmp_path, **{"train.compile": True, "train.compile_backend": "inductr"})
    )
    with pytest.raises(ClipkitError, match=r"train.compile_backend='inductr' is not .* known: .*inductor"):
        loop.train(cfg)


def test_memory_estimate_counts_grad_checkpointing(shards, tmp_path):
    from clipkit.training.memory import MemoryModel

    tree = tiny_tree(shards, tmp_path)
    tree["model"]["vision"].update(locked=False)
    tree["model"]["text"].update(locked=False, unlocked_layers=0)
    plain = MemoryModel.measure(from_dict(Config, tree))
    tree["train"]["grad_checkpointing"] = True
    checkpointed = MemoryModel.measure(from_dict(Config, tree))
    assert checkpointed.activation_per_sample < 0.6 * plain.activation_per_sample
