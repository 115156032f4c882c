"""Oracles for the tiled losses: dense parity (clipkit and open_clip), memory, and 3 gloo ranks."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from dist_helpers import free_port, gloo_group

from clipkit.losses import LOSSES, tiled
from clipkit.training.memory import LiveBytes

KEYS = ("image_emb", "text_emb", "logit_scale", "logit_bias")
# (B, D, tile): B below, equal to and above the tile, divisible by it or not
SHAPES = [(1, 3, 1), (7, 5, 3), (64, 32, 16), (100, 16, 33), (50, 8, 64), (130, 24, 64)]
# tiled loss + its args -> the dense clipkit loss + its args
PAIRS = {
    "clip": ("clip_tiled", {}, "clip", {}),
    "clip_smooth": ("clip_tiled", {"label_smoothing": 0.1}, "clip", {"label_smoothing": 0.1}),
    "clip_local": ("clip_tiled", {"local_loss": True}, "clip", {"local_loss": True}),
    "siglip": ("siglip_tiled", {}, "siglip", {}),
    "siglip_ring": ("siglip_tiled", {"dist_impl": "ring"}, "siglip", {}),
    "dcl": ("dcl_tiled", {}, "dcl", {}),
    "dcl_temperature": ("dcl_tiled", {"temperature": 0.3}, "dcl", {"temperature": 0.3}),
    "dclw": ("dclw_tiled", {"sigma": 0.4}, "dclw", {"sigma": 0.4}),
    "cwcl": ("cwcl_tiled", {}, "cwcl", {}),
    "cwcl_text": ("cwcl_tiled", {"targets_from": "text"}, "cwcl", {"targets_from": "text"}),
}


def inputs(b: int, d: int, seed: int, dtype: torch.dtype, scale: float = 10.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    emb = [F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1) for _ in range(2)]
    vals = [*emb, torch.tensor(scale, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)]
    out = {k: v.to(dtype).requires_grad_() for k, v in zip(KEYS, vals)}
    for side, width in (("image", 7), ("text", 4)):  # locked-tower features (CWCL's targets)
        out[f"{side}_tower_features"] = torch.randn(b, width, generator=g, dtype=torch.float64).to(dtype)
    return out


def value_and_grads(loss: torch.Tensor, out: dict) -> list[torch.Tensor]:
    gs = torch.autograd.grad(loss, [out[k] for k in KEYS], allow_unused=True)
    return [loss.detach()] + [torch.zeros_like(out[k]) if g is None else g for k, g in zip(KEYS, gs)]


def assert_same(got: list, want: list, rtol: float, atol: float, what: str) -> None:
    for name, a, b in zip(("loss",) + KEYS, got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{what} {n}: {m}")


pytestmark = pytest.mark.usefixtures("one_thread")


TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-13)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "case,b,d,tile",
    [(c, *s) for c in PAIRS for s in SHAPES if s[0] > 1 or not c.startswith("dcl")],  # DCL needs a negative
)
def test_tiled_equals_dense_clipkit(case, b, d, tile, dtype):
    name, args, dense, dense_args = PAIRS[case]
    out = inputs(b, d, seed=b + d, dtype=dtype)
    got = value_and_grads(LOSSES.build(name, tile_size=tile, **args)(out)["loss"], out)
    want = value_and_grads(LOSSES.build(dense, **dense_args)(out)["loss"], out)
    assert_same(got, want, *TOL[dtype], f"{case} B={b} D={d} tile={tile}")


@pytest.mark.parametrize("b,d,tile", [(64, 32, 16), (100, 16, 33)])
def test_tiled_equals_open_clip_float32(b, d, tile):
    import open_clip.loss as oc  # here, not at the top: the spawned ranks below import this file

    out = inputs(b, d, seed=3, dtype=torch.float32, scale=50.0)
    x, y, s, bias = (out[k] for k in KEYS)
    for ours, ref in (
        (LOSSES.build("clip_tiled", tile_size=tile)(out)["loss"], oc.ClipLoss()(x, y, s, bias)),
        (LOSSES.build("siglip_tiled", tile_size=tile)(out)["loss"], oc.SigLipLoss()(x, y, s, bias)),
    ):
        assert_same(value_and_grads(ours, out), value_and_grads(ref, out), 1e-5, 1e-6, "vs open_clip")


def test_clip_tiled_parts_and_hand_example():
    # The 2x2 example of tests/test_losses.py, one logit per block.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0]], dtype=torch.float64)
    got = LOSSES.build("clip_tiled", tile_size=1)(
        {"image_emb": img, "text_emb": txt, "logit_scale": torch.tensor(2.0, dtype=torch.float64)}
    )
    assert got["loss_i2t"].item() == pytest.approx(0.3881489, abs=1e-6)
    assert got["loss_t2i"].item() == pytest.approx(0.5199716, abs=1e-6)
    assert got["loss"].item() == pytest.approx(0.4540602, abs=1e-6)


def test_half_precision_embeddings_are_scored_in_float32():
    out = inputs(40, 16, seed=4, dtype=torch.float32)
    half = {k: v.detach().to(torch.bfloat16).requires_grad_() for k, v in out.items()}
    for name in ("clip_tiled", "siglip_tiled"):
        got = LOSSES.build(name, tile_size=16)(half)["loss"]
        assert got.dtype == torch.float32
        want = LOSSES.build(name, tile_size=16)({k: v.detach().float() for k, v in half.items()})["loss"]
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-6)
        for g in torch.autograd.grad(got, [half["image_emb"], half["text_emb"]]):
            assert g.dtype == torch.bfloat16 and torch.isfinite(g).all() and g.abs().sum() > 0


def test_tile_from_memory_budget():
    assert tiled.choose_tile(4, 256) == 4096  # 4 blocks of 4096^2 float32 = 256 MiB
    assert tiled.choose_tile(4, 1) == 256
    assert tiled.choose_tile(4, 0.001) == 64  # never below 64
    assert tiled.choose_tile(4, 100) % 64 == 0
    assert tiled.tile_bytes(tiled.choose_tile(4, 100), 4) <= 100 * 2**20
    assert tiled.choose_tile(4, 256, tile_size=33) == 33
    assert LOSSES.build("clip_tiled", memory_budget_mb=64).tile == 2048
    with pytest.raises(ValueError, match="tile_size must be >= 1"):
        LOSSES.build("clip_tiled", tile_size=0)
    with pytest.raises(ValueError, match="memory_budget_mb must be > 0"):
        LOSSES.build("siglip_tiled", memory_budget_mb=0)
    with pytest.raises(ValueError, match="dist_impl must be 'gather' or 'ring'"):
        LOSSES.build("siglip_tiled", dist_impl="bidir")


@pytest.mark.parametrize("name,dense", [("clip_tiled", "clip"), ("siglip_tiled", "siglip")])
def test_memory_is_linear_in_batch_not_quadratic(name, dense):
    """Bytes of tensor storage alive at the peak of forward + backward, above the inputs."""
    b, d, tile = 512, 16, 64

    def peak(loss_name: str, **kw) -> int:
        out = inputs(b, d, seed=5, dtype=torch.float32)
        with LiveBytes() as mem:
            LOSSES.build(loss_name, **kw)(out)["loss"].backward()
        return mem.peak

    n_by_d, tile_sq = 4 * b * d, 4 * tile * tile
    assert peak(name, tile_size=tile) <= 4 * n_by_d + 4 * tile_sq + 64 * b  # dx, dy, blocks, O(B) vectors
    assert peak(dense) >= 2 * 4 * b * b  # the dense loss holds (B, B) matrices: this test can fail


def test_memory_budget_bounds_the_blocks():
    n = 1024
    out = inputs(n, 8, seed=6, dtype=torch.float32)
    loss = LOSSES.build("clip_tiled", memory_budget_mb=0.25)  # 4 blocks of 128^2 float32
    assert loss.tile == 128
    with LiveBytes() as mem:
        loss(out)["loss"].backward()
    assert mem.peak <= 2**18 + 4 * (4 * n * 8) + 64 * n


# ----------------------------------------------------------------------------- 3 gloo processes

WORLD, B, D = 3, 5, 6  # 3 ranks: a ring whose neighbours differ on each side
DIST_CASES = {
    "clip_global_grad": ("clip_tiled", {}, "clip", {}),
    "clip_local_grad": ("clip_tiled", {"local_loss": True}, "clip", {"local_loss": True}),
    "clip_global_nograd": ("clip_tiled", {"gather_with_grad": False}, "clip", {"gather_with_grad": False}),
    "clip_local_nograd": (
        "clip_tiled",
        {"local_loss": True, "gather_with_grad": False, "label_smoothing": 0.2},
        "clip",
        {"local_loss": True, "gather_with_grad": False, "label_smoothing": 0.2},
    ),
    "siglip_gather": ("siglip_tiled", {}, "siglip", {}),
    "siglip_ring": ("siglip_tiled", {"dist_impl": "ring"}, "siglip", {}),
    "dclw": ("dclw_tiled", {}, "dclw", {}),
    "cwcl": ("cwcl_tiled", {}, "cwcl", {}),
}


def global_out() -> dict[str, torch.Tensor]:
    return inputs(WORLD * B, D, seed=7, dtype=torch.float64)


def rank_out(rank: int) -> dict[str, torch.Tensor]:
    return {
        k: (v[rank * B : (rank + 1) * B] if v.dim() else v).detach().requires_grad_()
        for k, v in global_out().items()
    }


def ring_or_gather_peak(dist_impl: str, b: int = 128, d: int = 32, tile: int = 32) -> int:
    out = inputs(b, d, seed=9, dtype=torch.float32)
    with LiveBytes() as mem:
        LOSSES.build("siglip_tiled", dist_impl=dist_impl, tile_size=tile)(out)["loss"].backward()
    return mem.peak


def rank_results(rank: int) -> dict:
    results = {}
    for case, (name, args, dense, dense_args) in DIST_CASES.items():
        for impl, loss in (
            ("tiled", LOSSES.build(name, tile_size=2, **args)),
            ("dense", LOSSES.build(dense, **dense_args)),
        ):
            out = rank_out(rank)
            results[case, impl] = value_and_grads(loss(out)["loss"], out)
    results["peak"] = {impl: ring_or_gather_peak(impl) for impl in ("gather", "ring")}
    return results


def worker(rank: int, port: int, folder: str) -> None:
    warnings.simplefilter("ignore")
    with gloo_group(rank, WORLD, port):
        torch.save(rank_results(rank), os.path.join(folder, f"rank{rank}.pt"))


def test_three_processes_tiled_equals_dense(tmp_path):
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for case, (_, args, dense, dense_args) in DIST_CASES.items():
        for r in range(WORLD):  # rank by rank: the dense loss with the same options
            assert_same(
                per_rank[r][case, "tiled"], per_rank[r][case, "dense"], 1e-12, 1e-13, f"{case} rank {r}"
            )
        if not args.get("gather_with_grad", True):
            continue
        # The single-process dense loss over the concatenated batch: the mean over ranks of the
        # loss and scalar grads, world_size x the embedding grads (DDP averaging undoes it).
        out = global_out()
        single = value_and_grads(LOSSES.build(dense, **dense_args)(out)["loss"], out)
        got = [per_rank[r][case, "tiled"] for r in range(WORLD)]
        for i in (0, 3, 4):  # loss, d/dscale, d/dbias
            mean = sum(g[i] for g in got) / WORLD
            torch.testing.assert_close(mean, single[i], msg=lambda m, i=i, c=case: f"{c} rank-mean {i}: {m}")
        for r in range(WORLD):
            for i in (1, 2):
                want = WORLD * single[i][r * B : (r + 1) * B]
                torch.testing.assert_close(
                    got[r][i], want, msg=lambda m, i=i, r=r, c=case: f"{c} rank {r} grad {i}: {m}"
                )
    # Memory: gather holds the (N, D) texts and their gradient; the ring at most the own
    # embeddings and gradients, one foreign block, its gradient and one in flight.
    block, tiles = 4 * 128 * 32, tiled.tile_bytes(32, 4)
    for r in range(WORLD):
        peak = per_rank[r]["peak"]
        assert peak["gather"] >= 2 * WORLD * block, peak
        assert peak["ring"] <= 7 * block + tiles + 64 * 128, peak
