"""The only cross-rank code of clipkit: gather per-rank batches into the global batch.

Every function here is the identity (no collective is called) unless
``torch.distributed`` is initialised with ``world_size > 1``; a loss is therefore a pure
function of tensors on one process, and the same code runs unchanged under DDP.

Gradient scaling under DDP (``gather_with_grad=True``). The gathered tensor's backward
sums, over ranks, the gradients every rank computed for a slice, and hands each rank
its own slice. If every rank's loss is a mean over its rows of the global batch (e.g.
``ClipLoss(local_loss=True)``, where the global loss is the mean over ranks of the rank
losses) or the global loss itself (``local_loss=False``), the gradient that reaches rank
r's local embeddings is ``world_size * dL_global / d emb_r``. DDP then *averages*
parameter gradients over ranks, which cancels the factor: the parameters receive
exactly the gradient of the single-process loss over the concatenated batch.
``tests/test_losses_dist.py`` checks this on two CPU processes.

Without gradient (``gather_with_grad=False``, open_clip's default), other ranks' slices
are constants and only the local slice keeps its graph (``keep_local_grad``). A rank that
computes the whole global loss (``ClipLoss(local_loss=False)``) then gets
``dL_global / d emb_r``: after DDP averaging the towers receive ``1 / world_size`` of the
global-loss gradient while ``logit_scale`` receives all of it. With ``local_loss`` the
gradient misses every term where the rank's samples are the negatives of another rank.

All ranks must pass tensors of the same shape (equal per-rank batch sizes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

_rank_local = False  # set by rank_local()


@contextlib.contextmanager
def rank_local() -> Iterator[None]:
    """Within the block every function here acts as in one process: a loss sees only this rank's
    batch and calls no collective (the validation loss, where ranks hold different numbers of
    batches, ``clipkit.training.evaluate``)."""
    global _rank_local
    before, _rank_local = _rank_local, True
    try:
        yield
    finally:
        _rank_local = before


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none (or
    inside ``rank_local``)."""
    if dist.is_available() and dist.is_initialized() and not _rank_local:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherCat(torch.autograd.Function):
    """all_gather along dim 0 whose backward hands each rank the summed grad of its slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world = dist_info()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ctx.rank, ctx.world, ctx.n = rank, world, x.shape[0]
        return torch.cat(parts, dim=0)  # (world * n, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # Sum every rank's gradient of the whole gathered tensor, keep our slice. An
        # all_reduce works on every backend (gloo has no reduce_scatter); the gathered
        # tensors are embeddings, so the extra traffic is small.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_cat(x: torch.Tensor, with_grad: bool = True, keep_local_grad: bool = True) -> torch.Tensor:
    """Concatenate ``x`` (n, ...) of every rank in rank order -> (world_size * n, ...).

    ``with_grad``: differentiable gather (see the module docstring for the scaling).
    Otherwise other ranks' slices are constants, and ``keep_local_grad`` decides whether
    the local slice keeps its graph. Identity when not distributed.
    """
    rank, world = dist_info()
    if world == 1:
        return x
    if with_grad:
        return _AllGatherCat.apply(x)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    if keep_local_grad:
        parts[rank] = x
    return torch.cat(parts, dim=0)


def gather_features(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    local_loss: bool = False,
    gather_with_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global-batch ``(all_image_emb, all_text_emb)``, each (world_size * B, D).

    Semantics follow open_clip's ``gather_features``: without ``gather_with_grad`` the
    local slice keeps its graph only when ``local_loss`` is false (with ``local_loss``
    the local rows already carry the gradient).
    """
    keep = not local_loss
    all_img = all_gather_cat(image_emb, with_grad=gather_with_grad, keep_local_grad=keep)
    all_txt = all_gather_cat(text_emb, with_grad=gather_with_grad, keep_local_grad=keep)
    return all_img, all_txt


def local_offset(n: int) -> int:
    """Row of this rank's first sample in the gathered global batch (``rank * n``)."""
    rank, _ = dist_info()
    return rank * n


def ring_exchange(x: torch.Tensor) -> torch.Tensor:
    """Send ``x`` to the next rank and return the previous rank's (ring order, no autograd).

    The neighbour exchange of ``siglip_tiled(dist_impl="ring")``: after ``k`` calls a rank
    holds the tensor of rank ``rank - k`` (mod world size). All ranks must call it together
    with tensors of the same shape. Identity when not distributed.
    """
    rank, world = dist_info()
    if world == 1:
        return x
    received = torch.empty_like(x)
    ops = [
        dist.P2POp(dist.isend, x.contiguous(), (rank + 1) % world),
        dist.P2POp(dist.irecv, received, (rank - 1) % world),
    ]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


def broadcast_from_first(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``x`` on every rank (no autograd); all ranks pass the same shape and dtype.

    For the random draws of a loss that every rank computes over the global batch (the
    mixing pairs of ``m3col``, ``mochi``): ranks are seeded differently, so rank 0 draws.
    Identity when not distributed.
    """
    _, world = dist_info()
    if world == 1:
        return x
    x = x.detach().clone().contiguous()
    dist.broadcast(x, src=0)
    return x
