"""Gradient caching: the same parameter gradients as one big batch (and 2 gloo ranks with DDP)."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from dist_helpers import free_port, gloo_group
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from clipkit.losses import LOSSES
from clipkit.training import gradcache
from clipkit.training.gradcache import grad_cache_step, split_batch

LOSS_CASES = {
    "clip": ("clip", {}),
    "clip_tiled": ("clip_tiled", {"tile_size": 5, "label_smoothing": 0.1}),
    "siglip": ("siglip", {}),
    "siglip_tiled": ("siglip_tiled", {"tile_size": 5}),
}


class TinyDual(nn.Module):
    """The DualEncoder contract on (B, 12) "images" and (B, 6) token ids; optional dropout / BN."""

    def __init__(self, p: float = 0.0, bn: bool = False):
        super().__init__()
        norm = nn.BatchNorm1d(16) if bn else nn.Identity()
        self.vision = nn.Sequential(nn.Linear(12, 16), norm, nn.GELU(), nn.Dropout(p), nn.Linear(16, 8))
        self.embed = nn.Embedding(50, 16)
        self.text = nn.Sequential(nn.Dropout(p), nn.Linear(16, 8))
        self.logit_scale = nn.Parameter(torch.tensor(2.3))
        self.logit_bias = nn.Parameter(torch.tensor(-2.0))

    def forward(self, batch: dict) -> dict:
        return {
            "image_emb": F.normalize(self.vision(batch["image"]), dim=-1),
            "text_emb": F.normalize(self.text(self.embed(batch["text"]).mean(dim=1)), dim=-1),
            "logit_scale": self.logit_scale.exp(),
            "logit_bias": self.logit_bias,
        }


def make_batch(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, 12, generator=g),
        "image_features": torch.randn(n, 5, generator=g),  # a locked tower's features (cwcl's targets)
        "text": torch.randint(0, 50, (n, 6), generator=g),
        "idx": torch.arange(n),
        "key": [f"k{i}" for i in range(n)],
        "skipped": {"decode_error": 1},
    }


def make_model(p: float = 0.0, bn: bool = False) -> TinyDual:
    torch.manual_seed(0)
    return TinyDual(p, bn).train()


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_equal(a: dict, b: dict, tol: float = 1e-5, what: str = "") -> None:
    """Every gradient equal to ``tol`` relative to its largest entry (float32 sums of many terms)."""
    assert a.keys() == b.keys(), (what, a.keys(), b.keys())
    for k, v in a.items():
        atol = tol * float(b[k].abs().max()) + 1e-7  # + float32 noise for a zero gradient (CLIP bias)
        torch.testing.assert_close(v, b[k], rtol=tol, atol=atol, msg=lambda m, k=k: f"{what} d/d{k}: {m}")


def reference(
    model: nn.Module, loss_fn: nn.Module, batch: dict, micro: int | None = None, scale: float = 1.0
):
    """One backward over the whole batch; the towers run per micro-batch if asked (same RNG use)."""
    parts = split_batch(batch, micro) if micro else [batch]
    outs = [model(p) for p in parts]
    out = {k: torch.cat([o[k] for o in outs]) if outs[0][k].dim() else outs[0][k] for k in outs[0]}
    loss = loss_fn({k: v.float() for k, v in out.items()}, batch)
    (loss["loss"] * scale).backward()
    return loss


pytestmark = pytest.mark.usefixtures("one_thread")


def test_split_batch_cuts_per_sample_entries_only():
    parts = split_batch(make_batch(7), 3)
    assert [len(p["key"]) for p in parts] == [3, 3, 1]
    assert [p["text"].shape[0] for p in parts] == [3, 3, 1]
    assert all(p["skipped"] == {"decode_error": 1} for p in parts)
    assert torch.equal(torch.cat([p["idx"] for p in parts]), torch.arange(7))
    with pytest.raises(ValueError, match="micro_batch must be >= 1"):
        split_batch(make_batch(2), 0)


@pytest.mark.parametrize("case", list(LOSS_CASES))
@pytest.mark.parametrize("micro", [1, 3, 8, 16])
def test_equals_one_big_batch(case, micro):
    name, args = LOSS_CASES[case]
    batch = make_batch(16)
    model, ref_model = make_model(), make_model()
    res = grad_cache_step(model, LOSSES.build(name, **args), batch, micro)
    want = reference(ref_model, LOSSES.build(name, **args), batch)
    assert_grads_equal(grads(model), grads(ref_model), what=f"{case} micro={micro}")
    torch.testing.assert_close(res["losses"]["loss"], want["loss"].detach())
    assert res["out"]["image_emb"].shape == (16, 8) and not res["out"]["image_emb"].requires_grad


def teacher() -> TinyDual:
    torch.manual_seed(7)
    return TinyDual().eval()


EXAMPLE_ARGS = {
    "sogclr": {"num_samples": 16},
    "isogclr": {"num_samples": 16},
    "distill_kl": {"teacher": teacher()},
    "dclip": {"teacher": teacher()},
    "albef_md": {"queue_size": 8},
}


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss(name):
    batch, loss_fn = make_batch(16), LOSSES.build(name, **EXAMPLE_ARGS.get(name, {}))
    ref_loss = copy.deepcopy(loss_fn)  # stateful losses: each run starts from the same state
    model, ref_model = make_model(), make_model()
    if hasattr(loss_fn, "attach"):  # as the training loop does (albef_md's momentum model)
        loss_fn.attach(model)
        ref_loss.attach(ref_model)
    grad_cache_step(model, loss_fn, batch, 5)
    reference(ref_model, ref_loss, batch)
    assert_grads_equal(grads(model), grads(ref_model), what=name)
    for (k, a), b in zip(loss_fn.state_dict().items(), ref_loss.state_dict().values()):
        torch.testing.assert_close(a, b, msg=lambda m, k=k: f"{name} state {k}: {m}")


def test_dropout_is_replayed_and_the_rng_stream_continues_as_after_one_pass():
    batch, loss_fn = make_batch(16), LOSSES.build("clip")
    model, ref_model = make_model(p=0.3), make_model(p=0.3)
    torch.manual_seed(1)
    grad_cache_step(model, loss_fn, batch, 5)
    after = torch.rand(3)
    torch.manual_seed(1)
    reference(ref_model, loss_fn, batch, micro=5)  # the same dropout masks, drawn once
    assert torch.equal(after, torch.rand(3))
    assert_grads_equal(grads(model), grads(ref_model), what="dropout")


def test_without_replay_dropout_breaks_the_parity(monkeypatch):
    # The oracle above can fail: the second pass must see the first pass's masks.
    monkeypatch.setattr(gradcache, "_set_rng_state", lambda state, device: None)
    batch, loss_fn = make_batch(16), LOSSES.build("clip")
    model, ref_model = make_model(p=0.3), make_model(p=0.3)
    torch.manual_seed(1)
    grad_cache_step(model, loss_fn, batch, 5)
    torch.manual_seed(1)
    reference(ref_model, loss_fn, batch, micro=5)
    with pytest.raises(AssertionError):
        assert_grads_equal(grads(model), grads(ref_model))


def test_accumulation_adds_scaled_steps():
    loss_fn = LOSSES.build("clip_tiled", tile_size=4)
    model, ref_model = make_model(), make_model()
    for seed in (0, 1):  # two accumulation steps, each its own contrastive batch
        grad_cache_step(model, loss_fn, make_batch(10, seed), 4, loss_scale=0.5, sync=seed == 1)
        reference(ref_model, loss_fn, make_batch(10, seed), scale=0.5)
    assert_grads_equal(grads(model), grads(ref_model), what="accumulation")


def test_bf16_autocast_matches_the_same_autocast_in_one_pass():
    batch, loss_fn = make_batch(16), LOSSES.build("siglip_tiled", tile_size=6)
    model, ref_model = make_model(), make_model()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    res = grad_cache_step(model, loss_fn, batch, 4, autocast=autocast)
    outs = []
    for part in split_batch(batch, 4):  # one autocast region each, as in grad_cache_step (a shared
        with autocast():  # region would share one bf16 weight copy and sum its gradients in bf16)
            outs.append(ref_model(part))
    out = {k: torch.cat([o[k] for o in outs]) if outs[0][k].dim() else outs[0][k] for k in outs[0]}
    loss_fn({k: v.float() for k, v in out.items()}, batch)["loss"].backward()
    assert res["out"]["image_emb"].dtype == torch.float32  # the loss ran on float32 copies
    assert_grads_equal(grads(model), grads(ref_model), tol=1e-4, what="bf16")


def test_batchnorm_statistics_are_updated_once_per_micro_batch():
    batch = make_batch(16)
    model, ref_model = make_model(bn=True), make_model(bn=True)
    grad_cache_step(model, LOSSES.build("clip"), batch, 4)
    with torch.no_grad():
        for part in split_batch(batch, 4):
            ref_model(part)
    for (name, a), (_, b) in zip(model.named_buffers(), ref_model.named_buffers()):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"{n}: {m}")
    assert int(model.vision[1].num_batches_tracked) == 4


def test_stateful_loss_runs_once_per_step():
    loss_fn = LOSSES.build("sogclr", num_samples=16, temperature=0.2)
    model = make_model()
    grad_cache_step(model, loss_fn, make_batch(16), 4)
    seen = torch.isfinite(loss_fn.log_u_img)
    assert int(seen.sum()) == 16  # every sample's state written by the one loss call


def test_a_real_dual_encoder_from_build_model():
    from clipkit.config import ModelConfig, TowerConfig
    from clipkit.models import build_model

    tower = TowerConfig(name="open_clip:clipkit-tiny-ViT", image_size=32, context_length=16)
    cfg = ModelConfig(vision=tower, text=tower, embed_dim=16, projection="linear", init_logit_bias=-5.0)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    ref_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(12, 3, 32, 32, generator=g),
        "text": model.tokenize(["a red cat"] * 6 + ["a dog"] * 6),
    }
    loss_fn = LOSSES.build("siglip_tiled", tile_size=5)
    grad_cache_step(model, loss_fn, batch, 5)
    reference(ref_model, loss_fn, batch)
    assert_grads_equal(grads(model), grads(ref_model), what="DualEncoder")


# ----------------------------------------------------------------------------- 2 gloo ranks, DDP

WORLD, B, MICRO = 2, 8, 3
DDP_CASES = {
    "clip_global": ("clip", {}, "clip", {}),
    "clip_local": ("clip", {"local_loss": True}, "clip", {}),
    "clip_tiled_global": ("clip_tiled", {"tile_size": 3}, "clip", {}),
    "clip_tiled_local": ("clip_tiled", {"tile_size": 3, "local_loss": True}, "clip", {}),
    "siglip": ("siglip", {}, "siglip", {}),
    "siglip_tiled_gather": ("siglip_tiled", {"tile_size": 3}, "siglip", {}),
    "siglip_tiled_ring": ("siglip_tiled", {"tile_size": 3, "dist_impl": "ring"}, "siglip", {}),
}


def ddp_grads(rank: int) -> dict:
    full = make_batch(WORLD * B)
    mine = {
        k: v[rank * B : (rank + 1) * B] if k in ("image", "text", "idx", "key") else v
        for k, v in full.items()
    }
    results = {}
    for case, (name, args, _, _) in DDP_CASES.items():
        for cached in (False, True):
            model = make_model()
            ddp, loss_fn = DDP(model), LOSSES.build(name, **args)
            if cached:
                grad_cache_step(ddp, loss_fn, mine, MICRO, no_sync=lambda m: m.no_sync())
            else:
                loss_fn(ddp(mine), mine)["loss"].backward()
            results[case, cached] = grads(model)
    return results


def ddp_worker(rank: int, port: int, folder: str) -> None:
    warnings.simplefilter("ignore")
    with gloo_group(rank, WORLD, port):
        torch.save(ddp_grads(rank), os.path.join(folder, f"rank{rank}.pt"))


def test_two_ranks_with_ddp_equal_one_process_over_the_whole_batch(tmp_path):
    mp.spawn(ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for case, (_, _, dense, dense_args) in DDP_CASES.items():
        ref_model = make_model()
        reference(ref_model, LOSSES.build(dense, **dense_args), make_batch(WORLD * B))
        want = grads(ref_model)
        for r in range(WORLD):
            for cached in (False, True):
                what = f"{case} rank {r} {'gradient caching' if cached else 'plain'}"
                assert_grads_equal(per_rank[r][case, cached], want, what=what)
