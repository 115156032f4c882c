"""Tiled kernels of the contrastive losses: memory O(tile^2 + N D) instead of O(N^2).

A dense loss materialises the (N_x, N_y) logits ``z = s x @ y.T`` (and autograd keeps
several such matrices for backward). Here the logits exist only one (tile, tile) block at
a time. Each kernel is a ``torch.autograd.Function`` whose forward keeps only reductions
(row / column logsumexps, or a scalar sum) and whose backward recomputes every block from
the saved embeddings to accumulate ``dL/dx``, ``dL/dy``, ``dL/ds`` (and ``dL/db``). Each
block is computed twice in all (forward, backward): about 4 matmuls of the block where a
dense loss runs 3 (open_clip's ClipLoss runs 6: it computes both logit matrices).

- ``softmax_xent(x, y, scale, tile, rows, cols, xent)``: per-row and / or per-column
  softmax cross-entropy of ``z`` (CLIP with label smoothing, DCL, ...): logsumexps plus
  linear terms, so that no (N, D) temporary is made. Backward: ``dz_ij = g_row_i
  (softmax_row(z)_ij - target_ij) + g_col_j (softmax_col(z)_ij - target_ij)``.
- ``sigmoid_pairs(x, y, scale, bias, tile, pos_offset)``: ``sum_ij -log sigmoid(l_ij z_ij)``
  with ``z = s x @ y.T + b``, ``l = +1`` at ``(i, i + pos_offset)`` and -1 elsewhere (SigLIP).
- ``sigmoid_ring(...)``: the same over the text blocks of all ranks, passed around the ring
  (``clipkit.losses.gather.ring_exchange``); memory stays O(B D) as ranks are added.

The registered losses built on them are in ``tiled_clip.py``, ``tiled_siglip.py`` and
``tiled_zoo.py``. The kernels do not support double backward; ``scale`` must be nonzero (a
logit scale or an inverse temperature is > 0). No host synchronisation happens inside them
(the scale stays a tensor), so they run as well on a GPU and on the ``meta`` device.
``choose_tile`` turns a memory budget into a tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clipkit.losses.gather import dist_info, ring_exchange

DEFAULT_MEMORY_BUDGET_MB = 256.0
# (tile, tile) buffers alive at a kernel's peak: the recomputed block, the row and the column
# softmax of the CLIP backward, plus one temporary of an elementwise op.
TILE_BUFFERS = 4


def choose_tile(elem_bytes: int, memory_budget_mb: float, tile_size: int | None = None) -> int:
    """Side of the square logit block: ``tile_size`` if given, else the largest multiple of 64
    (at least 64) whose ``TILE_BUFFERS`` blocks of ``elem_bytes`` fit ``memory_budget_mb``."""
    if tile_size is not None:
        if tile_size < 1:
            raise ValueError(
                f"tile_size must be >= 1 (or None to size it from memory_budget_mb), got {tile_size}"
            )
        return int(tile_size)
    if memory_budget_mb <= 0:
        raise ValueError(f"memory_budget_mb must be > 0, got {memory_budget_mb}")
    side = math.isqrt(int(memory_budget_mb * 2**20 / (TILE_BUFFERS * elem_bytes)))
    return max(64, side // 64 * 64)


def tile_bytes(tile: int, elem_bytes: int) -> int:
    """Peak bytes of a kernel's logit blocks (what ``memory_budget_mb`` bounds)."""
    return TILE_BUFFERS * tile * tile * elem_bytes


def _row_blocks(x: torch.Tensor, scale: torch.Tensor, tile: int):
    """``(i0, i1, scale * x[i0:i1])`` of every row block (the scale folded into the (ti, D)
    rows once, instead of into every (ti, tj) block of logits)."""
    for i0 in range(0, x.shape[0], tile):
        i1 = min(i0 + tile, x.shape[0])
        yield i0, i1, x[i0:i1] * scale


def _cols(n: int, tile: int):
    for j0 in range(0, n, tile):
        yield j0, min(j0 + tile, n)


def _diag(block: torch.Tensor, i0: int, j0: int, offset: int | None):
    """``(view, global rows, global cols)`` of the entries ``(i, i + offset)`` inside ``block``
    (rows i0.., cols j0.. of the full matrix), or None when none falls in it."""
    if offset is None:
        return None
    k = i0 + offset - j0  # local diagonal: entries (a, a + k)
    ti, tj = block.shape
    if not -ti < k < tj:
        return None
    a0 = max(0, -k)
    n = min(ti, tj - k) - a0
    return block.diagonal(k), slice(i0 + a0, i0 + a0 + n), slice(j0 + a0 + k, j0 + a0 + k + n)


# ----------------------------------------------------------------------------- softmax: cross-entropy


@dataclass(frozen=True)
class Xent:
    """What ``softmax_xent`` subtracts from each logsumexp; see there."""

    pos_offset: int | None = 0
    pos_weight: float = 1.0
    smoothing: float = 0.0
    exclude_pos: bool = False


def _xent_forward(x, y, scale, tile: int, rows: bool, cols: bool, o: Xent):
    nx, ny = x.shape[0], y.shape[0]
    lse_r, lse_c = x.new_full((nx if rows else 0,), -math.inf), x.new_full((ny if cols else 0,), -math.inf)
    lin_r, lin_c = torch.zeros_like(lse_r), torch.zeros_like(lse_c)  # the linear terms
    for i0, i1, xs in _row_blocks(x, scale, tile):
        for j0, j1 in _cols(ny, tile):
            z = torch.mm(xs, y[j0:j1].T)  # (ti, tj) logits of the block
            d = _diag(z, i0, j0, o.pos_offset)
            if d is not None and o.pos_weight:
                if rows:
                    lin_r[d[1]].add_(d[0], alpha=o.pos_weight)
                if cols:
                    lin_c[d[2]].add_(d[0], alpha=o.pos_weight)
            if o.smoothing:
                if rows:
                    lin_r[i0:i1].add_(z.sum(dim=1), alpha=o.smoothing / ny)
                if cols:
                    lin_c[j0:j1].add_(z.sum(dim=0), alpha=o.smoothing / nx)
            if d is not None and o.exclude_pos:
                d[0].fill_(-math.inf)
            if rows:
                lse_r[i0:i1] = torch.logaddexp(lse_r[i0:i1], torch.logsumexp(z, dim=1))
            if cols:
                lse_c[j0:j1] = torch.logaddexp(lse_c[j0:j1], torch.logsumexp(z, dim=0))
    return lse_r, lse_c, lse_r - lin_r, lse_c - lin_c


def _xent_backward(x, y, scale, tile: int, lse_r, lse_c, g_r, g_c, o: Xent, dx, dy) -> torch.Tensor:
    """Accumulate dL/dx into ``dx``, dL/dy into ``dy``; return dL/dscale (0-dim, float64)."""
    nx, ny = x.shape[0], y.shape[0]
    ds = torch.zeros((), dtype=torch.float64, device=x.device)
    for i0, i1, xs in _row_blocks(x, scale, tile):
        acc = torch.zeros_like(xs)  # dL/dx of the row block, over the scale
        for j0, j1 in _cols(ny, tile):
            z = torch.mm(xs, y[j0:j1].T)  # (ti, tj) logits, recomputed
            g = None  # dL/dz of the block: (softmax - target) times the upstream gradient
            for lse, grad, shape, sl in (
                (lse_r, g_r, (-1, 1), slice(i0, i1)),
                (lse_c, g_c, (1, -1), slice(j0, j1)),
            ):
                if grad is None:
                    continue
                p = torch.sub(z, lse[sl].view(shape))
                d = _diag(p, i0, j0, o.pos_offset) if o.exclude_pos else None
                if d is not None:
                    d[0].fill_(-math.inf)
                p.exp_().mul_(grad[sl].view(shape))
                if o.smoothing:
                    p.sub_(grad[sl].view(shape), alpha=o.smoothing / (ny if shape[1] == 1 else nx))
                g = p if g is None else g.add_(p)
                del p
            if g is None:
                continue
            d = _diag(g, i0, j0, o.pos_offset) if o.pos_weight else None
            if d is not None:
                for grad, idx in ((g_r, d[1]), (g_c, d[2])):
                    if grad is not None:
                        d[0].sub_(grad[idx], alpha=o.pos_weight)
            acc.addmm_(g, y[j0:j1])
            dy[j0:j1].addmm_(g.T, xs)  # xs carries the scale
            ds += torch.dot(g.flatten(), z.flatten())
        dx[i0:i1].addcmul_(acc, scale)  # the scale as a tensor: no host sync (GPU), runs on meta
    return ds / scale  # sum g * z / scale = sum g * (x . y)


class _SoftmaxXent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, tile: int, rows: bool, cols: bool, o: Xent):  # type: ignore[override]
        lse_r, lse_c, out_r, out_c = _xent_forward(x, y, scale, tile, rows, cols, o)
        ctx.save_for_backward(x, y, scale, lse_r, lse_c)
        ctx.tile, ctx.o = tile, o
        return out_r, out_c

    @staticmethod
    def backward(ctx, g_r, g_c):  # type: ignore[override]
        x, y, scale, lse_r, lse_c = ctx.saved_tensors
        g_r = g_r if lse_r.numel() else None
        g_c = g_c if lse_c.numel() else None
        dx, dy = torch.zeros_like(x), torch.zeros_like(y)
        ds = _xent_backward(x, y, scale, ctx.tile, lse_r, lse_c, g_r, g_c, ctx.o, dx, dy)
        return dx, dy, ds.to(scale.dtype).reshape(scale.shape), None, None, None, None


def softmax_xent(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    tile: int,
    rows: bool = True,
    cols: bool = True,
    xent: Xent = Xent(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (N_x,) and per-column (N_y,) softmax cross-entropy terms of ``z = scale x @ y.T``.

    With ``p = xent.pos_offset`` (row i's positive is column i + p), ``w = xent.pos_weight``,
    ``eps = xent.smoothing``::

        row_i = logsumexp_j z_ij - w z_{i,i+p} - eps mean_j z_ij
        col_j = logsumexp_i z_ij - w z_{j-p,j} - eps mean_i z_ij

    so ``w = 1 - eps`` gives ``F.cross_entropy(..., label_smoothing=eps)``. ``exclude_pos``
    leaves the positives out of the logsumexps (DCL). A direction not asked for comes back
    empty (0,). ``scale`` is a 0-dim tensor of ``x``'s dtype (it may require grad).
    """
    if xent.exclude_pos and xent.smoothing:
        raise ValueError(
            "softmax_xent: label smoothing over a denominator without the positive is not defined"
        )
    return _SoftmaxXent.apply(x, y, scale, tile, rows, cols, xent)


# ----------------------------------------------------------------------------- sigmoid: pair sums


def _sigmoid_forward(x, y, scale, bias, tile: int, pos: int | None) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for i0, _, xs in _row_blocks(x, -scale, tile):
        for j0, j1 in _cols(y.shape[0], tile):
            w = torch.mm(xs, y[j0:j1].T).sub_(bias)  # -z: every pair a negative ...
            d = _diag(w, i0, j0, pos)
            if d is not None:
                d[0].neg_()  # ... but the positives: w = l * z
            total -= F.logsigmoid(w).sum().double()  # block sum in float32 (a float64 sum would copy w)
    return total


def _sigmoid_backward(x, y, scale, bias, tile: int, pos: int | None, grad, dx, dy):
    """Accumulate into ``dx``, ``dy``; return (dL/dscale, dL/dbias), 0-dim float64."""
    ds = torch.zeros((), dtype=torch.float64, device=x.device)
    db = torch.zeros_like(ds)
    for i0, i1, xs in _row_blocks(x, scale, tile):
        acc = torch.zeros_like(xs)
        for j0, j1 in _cols(y.shape[0], tile):
            sxy = torch.mm(xs, y[j0:j1].T)  # (ti, tj) scale * cosines
            g = torch.add(sxy, bias)  # z
            d = _diag(g, i0, j0, pos)
            z_pos = None if d is None else d[0].clone()
            g.sigmoid_()  # d/dz -log sigmoid(-z) = sigmoid(z) for a negative ...
            if d is not None:
                d[0].copy_(torch.sigmoid(z_pos.neg_()).neg_())  # ... -sigmoid(-z) for a positive
            g.mul_(grad)
            acc.addmm_(g, y[j0:j1])
            dy[j0:j1].addmm_(g.T, xs)
            ds += torch.dot(g.flatten(), sxy.flatten())
            db += g.sum().double()
        dx[i0:i1].addcmul_(acc, scale)
    return ds / scale, db


def _scalar_grads(ds: torch.Tensor, db: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor):
    return ds.to(scale.dtype).reshape(scale.shape), db.to(bias.dtype).reshape(bias.shape)


class _SigmoidPairs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, bias, tile: int, pos: int | None):  # type: ignore[override]
        ctx.save_for_backward(x, y, scale, bias)
        ctx.tile, ctx.pos = tile, pos
        return _sigmoid_forward(x, y, scale, bias, tile, pos).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, y, scale, bias = ctx.saved_tensors
        dx, dy = torch.zeros_like(x), torch.zeros_like(y)
        ds, db = _sigmoid_backward(x, y, scale, bias, ctx.tile, ctx.pos, grad, dx, dy)
        return (dx, dy, *_scalar_grads(ds, db, scale, bias), None, None)


class _SigmoidRing(torch.autograd.Function):
    """This rank's images against every rank's texts; the text blocks travel the ring.

    Forward: score the own block (positives on its diagonal), then W - 1 times receive the
    left neighbour's block (all negatives) while passing the current one to the right.
    Backward: the same walk, each block travelling with the gradient accumulated for it so
    far; a last hop returns every block's gradient to its owner. Only one foreign block
    (and its gradient) is alive at a time: memory O(B D) whatever the world size.
    """

    @staticmethod
    def forward(ctx, x, y, scale, bias, tile: int):  # type: ignore[override]
        s, b = scale, bias
        total = _sigmoid_forward(x, y, s, b, tile, 0)
        block = y
        for _ in range(dist_info()[1] - 1):
            block = ring_exchange(block)
            total += _sigmoid_forward(x, block, s, b, tile, None)
        ctx.save_for_backward(x, y, scale, bias)
        ctx.tile = tile
        return total.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, y, scale, bias = ctx.saved_tensors
        s, b, g, world = scale, bias, grad, dist_info()[1]
        dx, block, d_block = torch.zeros_like(x), y, torch.zeros_like(y)
        ds, db = _sigmoid_backward(x, block, s, b, ctx.tile, 0, g, dx, d_block)
        for _ in range(world - 1):
            block, d_block = ring_exchange(block), ring_exchange(d_block)
            ds_k, db_k = _sigmoid_backward(x, block, s, b, ctx.tile, None, g, dx, d_block)
            ds, db = ds + ds_k, db + db_k
        dy = ring_exchange(d_block) if world > 1 else d_block  # home: block r+1 -> rank r+1
        return (dx, dy, *_scalar_grads(ds, db, scale, bias), None)


def sigmoid_pairs(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    tile: int,
    pos_offset: int | None,
) -> torch.Tensor:
    """``sum_ij -log sigmoid(l_ij z_ij)``, ``z = scale x @ y.T + bias`` (0-dim result, x's dtype).

    ``l_ij = +1`` at ``(i, i + pos_offset)`` and -1 elsewhere (``pos_offset=None``: all
    negatives). Partial sums are accumulated in float64.
    """
    return _SigmoidPairs.apply(x, y, scale, bias, tile, pos_offset)


def sigmoid_ring(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, tile: int
) -> torch.Tensor:
    """``sigmoid_pairs`` of this rank's ``x`` (B, D) against the texts ``y`` of every rank,
    positives on the own block's diagonal, with neighbour exchange instead of a gather."""
    return _SigmoidRing.apply(x, y, scale, bias, tile)
