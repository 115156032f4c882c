"""Text towers run on the batch's longest caption, not the full context: trailing padding is cut.

The tokenizers pad every caption to the context length (e.g. 32 or 77 tokens) while captions are
often a few tokens long; the text tower's cost grows with the padded length. Cutting the columns
that are padding in every row of the batch changes no output, for two kinds of tower:

* open_clip's causal text transformer (``CLIP.encode_text``, ``TextTransformer``) pooled at the
  end-of-text token (``argmax`` / ``eos`` pooling): under the causal mask position ``i`` attends to
  positions ``<= i`` only, so the pooled position never sees a later one. The batch is cut after
  its last pooled position; positions, the mask and pooling are sliced alike. On a CPU the
  tokens are then packed (``packed_block``): the norms, projections and MLPs, which act per
  token, run on the real tokens alone, and only attention sees the padded layout. A tower whose
  blocks cannot be packed groups its rows by length instead, each group cut to its own longest
  (``length_groups``). On a GPU the batch runs as one group (``group_overhead``). The last
  block runs for the pooled rows only (``clipkit.models.pooled_block``).
* Hugging Face encoders with an attention mask (pad keys get zero weight) and mean pooling over
  non-pad tokens: the cut columns are pad keys and pad rows that pooling drops.

Outputs equal the full-context forward up to float rounding (different matrix sizes sum in a
different order). A tower that could be affected (bidirectional attention, ``last`` / ``first``
pooling, a class token appended at the end) runs at the full length.

Under ``torch.compile`` (``train.compile``) the text runs at the full context instead: a length
that changes with every batch is a new shape, and each one recompiled the graph, with guards
over every row's length. On a 2-core CPU, ``train/tiny_openclip.yaml`` with ``train.compile=true``
recompiled 5 times in its first 20 steps, which took 174.7 s; at the full context every batch
has the same shape, the graph compiles once and the 20 steps take 26.6 s (``uncut``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from clipkit.models.pooled_block import plain_block, pooled_block, pooled_transformer, run_pooled

# open_clip pooling types whose pooled position is a token of the caption (its end-of-text).
TRIMMABLE_POOLS = ("argmax", "eos")


def pooled_positions(text: Tensor, pool_type: str, eos_id: int | None) -> Tensor:
    """(B,) index of the token each row is pooled at, as ``open_clip.transformer.text_global_pool``."""
    if pool_type == "argmax":
        return text.argmax(dim=-1)  # the end-of-text token has the highest id
    return (text == eos_id).int().argmax(dim=-1)


def kept_length(text: Tensor, pool_type: str, eos_id: int | None) -> int:
    """Columns of ``text`` (B, L) the pooled outputs depend on under a causal mask."""
    if text.shape[0] == 0:
        return text.shape[1]
    return int(pooled_positions(text, pool_type, eos_id).max()) + 1


@dataclass(frozen=True)
class CausalText:
    """The parts of an open_clip causal text encoder, read once from ``ClipText`` / ``TextTransformer``."""

    pool_type: str
    eos_id: int | None
    pooled_last_block: bool = False  # the last block runs for the pooled rows only
    packed: bool = False  # on a CPU, every block's per-token work runs on the real tokens alone


def causal_text_spec(m: nn.Module) -> CausalText | None:
    """``CausalText`` when ``m``'s forward may be cut to the pooled positions, else None."""
    pool = getattr(m, "text_pool_type", getattr(m, "pool_type", None))
    eos = getattr(m, "text_eos_id", getattr(m, "eos_id", None))
    ok = (
        getattr(m, "attn_mask", None) is not None  # causal (no_causal_mask=False)
        and getattr(m, "cls_emb", None) is None  # CoCa's class token is appended after the padding
        and not getattr(m, "use_pad_mask", False)
        and not getattr(m, "output_tokens", False)  # token outputs would change shape
        and pool in TRIMMABLE_POOLS
        and (pool != "eos" or eos is not None)
    )
    if not ok:
        return None
    return CausalText(pool, eos, pooled_transformer(m.transformer), packable(m.transformer, m.attn_mask))


def _plain_attention(attn: nn.MultiheadAttention) -> bool:
    """True for self-attention that ``packed_block`` writes out: one packed in-projection, no
    extra key / value biases or zero attention, no attention dropout."""
    return (
        attn._qkv_same_embed_dim
        and attn.in_proj_weight is not None
        and attn.bias_k is None
        and attn.bias_v is None
        and not attn.add_zero_attn
        and attn.dropout == 0.0
    )


def packable(transformer: nn.Module, attn_mask: Tensor) -> bool:
    """True when every block of open_clip ``Transformer`` ``transformer`` may run on packed
    tokens (``packed_block``): batch-first plain blocks and ``attn_mask`` exactly the causal one
    (0 on and below the diagonal, -inf above)."""
    blocks = getattr(transformer, "resblocks", None)
    if not blocks or not getattr(transformer, "batch_first", False):
        return False
    if not all(plain_block(b) and _plain_attention(b.attn) for b in blocks):
        return False
    if attn_mask.dim() != 2 or attn_mask.shape[0] != attn_mask.shape[1] or not attn_mask.is_floating_point():
        return False
    above = torch.ones(attn_mask.shape, dtype=torch.bool, device=attn_mask.device).triu(1)
    return bool((attn_mask[above] == -math.inf).all() and (attn_mask[~above] == 0).all())


# What one more group costs, in tokens of work, for a tower of width REFERENCE_WIDTH: its own call
# of every layer, and matrix products on fewer rows, which run further from peak. Measured on a
# 2-core CPU (ViT-S-32-alt's text tower, width 256, forward and backward, batches of 64 emoji
# captions, 3 runs each): 10**9 (never split) 372-385 ms a batch; 48 304-307; 96 302-304; 192
# 305-306. A group's fixed cost (the calls) hardly depends on the width, a token's work grows with
# its square, so the overhead in tokens scales as (REFERENCE_WIDTH / width)**2 (``group_overhead``):
# the tiny ViT's text tower (width 64) gets 2,048, more than a batch of 64 x 16 tokens can save,
# and runs as one group. Measured on a 2-core AVX-512 CPU, forward and backward of batches of 64
# emoji captions, the rules alternating in one process: width 64, the flat 128 tokens 15.6 ms a
# batch against one group 13.9 ms (``benchmarks/step_levers.py --text-groups``, 5 rounds; a
# throwaway script's 15 rounds gave 16.9 against 13.8); width 256, two groups 260 ms against one
# 298 ms.
GROUP_OVERHEAD_TOKENS = 128
REFERENCE_WIDTH = 256


def group_overhead(width: int, device: torch.device | None = None) -> float:
    """``GROUP_OVERHEAD_TOKENS`` for a transformer of ``width`` (see above) on a CPU; infinite,
    so one group, on any other device.

    The CPU figure does not carry over to a GPU, where a group's fixed cost (a few hundred
    small kernels forward and backward, each launched from Python) dwarfs the tokens it saves.
    Profiled on an H200 (``benchmarks/gpu_smoke.sh``'s ViT-B/32 run, batch 256 of emoji
    captions, bf16, cProfile over 32 steps): the text tower, split into 6.8 groups a step on
    average, took 0.75 s of each step's forward against 0.10 s for the vision tower, and made
    81 of the step's 93 attention calls, where one group makes 12.
    """
    if device is not None and torch.device(device).type != "cpu":
        return math.inf
    return GROUP_OVERHEAD_TOKENS * (REFERENCE_WIDTH / max(1, width)) ** 2


def length_groups(lengths: list[int], overhead: float = GROUP_OVERHEAD_TOKENS) -> list[list[int]]:
    """Rows (indices into ``lengths``) in groups of similar length, each to be cut to its own
    longest: the split of the rows sorted by length that minimises the padded tokens,
    sum(group size x its longest), plus ``overhead`` per group. Exact (dynamic programming over
    the distinct lengths, at most the context length of them)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    if math.isinf(overhead):  # a group costs more than any tokens it saves: one group
        return [order]
    distinct = sorted(set(lengths))
    ends, count = [], 0  # ends[k]: rows with length <= distinct[k]
    for d in distinct:
        count += lengths.count(d)
        ends.append(count)
    best, cut = [0] + [None] * len(distinct), [0] * (len(distinct) + 1)  # best[k]: first k lengths
    for k in range(1, len(distinct) + 1):
        for i in range(k):  # a group of the lengths distinct[i:k], cut to distinct[k - 1]
            rows = ends[k - 1] - (ends[i - 1] if i else 0)
            cost = best[i] + rows * distinct[k - 1] + overhead
            if best[k] is None or cost < best[k]:
                best[k], cut[k] = cost, i
    groups, k = [], len(distinct)
    while k:
        i = cut[k]
        groups.append(order[(ends[i - 1] if i else 0) : ends[k - 1]])
        k = i
    return groups[::-1]


def uncut() -> bool:
    """True while ``torch.compile`` traces: the text keeps its full, fixed context (see above)."""
    return torch.compiler.is_compiling()


def causal_text_forward(m: nn.Module, text: Tensor, spec: CausalText) -> Tensor:
    """``CLIP.encode_text`` (unnormalised) of open_clip's causal text encoder ``m``; returns
    (B, embed_dim). On a CPU the real tokens run packed (``_packed_text_rows``). Otherwise rows
    are grouped by length (``length_groups``) and each group runs on its columns up to its own
    last pooled position: a row's output depends on its own tokens only (no layer mixes the
    rows of a batch), so a short caption never pays for a long one's columns. On emoji
    captions (7 tokens on average, up to 17; batches of 64 hold 451 real tokens and 965 when
    cut to the longest) length groups take ~20 % off the text tower's forward and backward.
    The token embedding runs once for the whole batch: its backward builds a dense gradient of
    the whole vocabulary table, once, not once per group."""
    if text.shape[0] == 0:
        return _causal_text_rows(m, _embed(m, text), text, text.new_zeros(0), spec)
    rows = pooled_positions(text, spec.pool_type, spec.eos_id)  # (B,) each row's pooled position
    if uncut():  # compiled: one shape for every batch, no host sync
        return _causal_text_rows(m, _embed(m, text), text, rows, spec)
    lengths = (rows + 1).tolist()
    n = max(lengths)  # kept_length
    text = text[:, :n]  # (B, n)
    x = _embed(m, text)  # (B, n, width)
    if spec.packed and packs(x.device):
        return _packed_text_rows(m, x, rows, spec)
    groups = length_groups(lengths, group_overhead(x.shape[-1], x.device)) if text.shape[0] > 1 else [[0]]
    if len(groups) == 1:
        return _causal_text_rows(m, x, text, rows, spec)
    outs = []
    for g in groups:
        idx = torch.tensor(g, device=text.device)
        k = max(lengths[i] for i in g)  # this group's columns
        outs.append(_causal_text_rows(m, x[idx, :k], text[idx, :k], rows[idx], spec))
    order = torch.tensor([i for g in groups for i in g], device=text.device)
    return torch.cat(outs)[torch.argsort(order)]  # back to the batch's order


def real_positions(valid: Tensor) -> Tensor:
    """(T,) flat indices of the True entries of ``valid`` (B, n): a padded batch's real tokens,
    row after row, as packed (``packed_block``, ``clipkit.models.packed_hf``)."""
    return valid.reshape(-1).nonzero().squeeze(1)


def scatter_padded(x: Tensor, real: Tensor, size: int) -> Tensor:
    """Packed rows ``x`` (T, C) back in a padded batch of ``size`` rows (B * n, C), zeros at
    the padding; ``real`` from ``real_positions``."""
    return x.new_zeros(size, x.shape[1]).index_copy(0, real, x)


def packs(device: torch.device) -> bool:
    """True where the text runs packed (``packed_block``): on a CPU, where it was measured. On a
    GPU the batch runs as one group, as measured there (``group_overhead``)."""
    return torch.device(device).type == "cpu"


def packed_block(block: nn.Module, h: Tensor, real: Tensor, batch: int, n: int) -> Tensor:
    """open_clip ``ResidualAttentionBlock`` (``plain_block``, ``_plain_attention``) under the
    causal mask, on packed tokens: (T, W) -> (T, W).

    ``h`` holds the real tokens of a (batch, n) padded batch, row after row; ``real`` (T,) is
    their flat index in it. The norms, the in- and out-projections and the MLP act per token,
    so they run on the T real tokens alone; attention scatters queries, keys and values back
    to (batch, heads, n, head_dim), zeros at the padding, and runs causally. A real token at
    position i of its row attends to keys 0..i, all real, as in the padded forward; the padded
    positions' outputs are dropped. The operations are ``nn.MultiheadAttention``'s (one packed
    in-projection, scaled dot-product attention at the default 1/sqrt(head_dim) scale, the
    out-projection) in the same order, so outputs equal the padded block's up to float rounding.
    """
    attn = block.attn
    heads, width = attn.num_heads, h.shape[1]
    qkv = F.linear(block.ln_1(h), attn.in_proj_weight, attn.in_proj_bias)  # (T, 3W)
    padded = scatter_padded(qkv, real, batch * n)  # (B * n, 3W)
    q, k, v = (
        padded.view(batch, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    )  # (B, H, n, hd)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, n, hd)
    a = a.transpose(1, 2).reshape(batch * n, width).index_select(0, real)  # (T, W)
    h = h + block.ls_1(attn.out_proj(a))
    return h + block.ls_2(block.mlp(block.ln_2(h)))


def _packed_text_rows(m: nn.Module, x: Tensor, rows: Tensor, spec: CausalText) -> Tensor:
    """``_causal_text_rows`` with every block's per-token work on the real tokens only
    (``packed_block``): x (B, n, width) token embeddings, rows (B,) each row's pooled position,
    its last real token. On emoji captions a batch of 64 holds ~451 real tokens, against ~640
    in length groups and ~960 cut to the longest; the text tower's forward and backward took
    ~30 % less than in length groups (ViT-S-32-alt, 2-core CPU)."""
    batch, n, width = x.shape
    lengths = rows + 1
    real = real_positions(torch.arange(n, device=x.device)[None, :] < lengths[:, None])  # (T,)
    h = x.reshape(batch * n, width).index_select(0, real)  # (T, width)
    ckpt = m.transformer.grad_checkpointing and torch.is_grad_enabled()
    *body, last = m.transformer.resblocks
    for block in body if spec.pooled_last_block else m.transformer.resblocks:
        h = (
            checkpoint(packed_block, block, h, real, batch, n, use_reentrant=False)
            if ckpt
            else packed_block(block, h, real, batch, n)
        )
    if spec.pooled_last_block:  # keys and values of every real token, the rest at the pooled rows only
        padded = scatter_padded(h, real, batch * n).view(batch, n, width)
        after = torch.arange(n, device=x.device)[None, :] > rows[:, None]  # (B, n) keys after the pooled one
        if ckpt:
            x = checkpoint(pooled_block, last, padded, rows, after, use_reentrant=False)
        else:
            x = pooled_block(last, padded, rows, after)  # (B, width)
    else:
        x = h.index_select(0, torch.cumsum(lengths, 0) - 1)  # each row's last real token: (B, width)
    x = m.ln_final(x)
    if m.text_projection is not None:
        x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection
    return x


def _embed(m: nn.Module, text: Tensor) -> Tensor:
    """Token and position embeddings of ``text`` (B, n) -> (B, n, width), as ``CLIP.encode_text``."""
    cast_dtype = m.transformer.get_cast_dtype()
    x = m.token_embedding(text).to(cast_dtype)
    return x + m.positional_embedding[: text.shape[1]].to(cast_dtype)


def _causal_text_rows(m: nn.Module, x: Tensor, text: Tensor, rows: Tensor, spec: CausalText) -> Tensor:
    """The transformer, final norm, pooling and projection of ``causal_text_forward`` on token
    embeddings ``x`` (B, n, width) of ``text`` (B, n) pooled at ``rows`` (B,), n up to their
    last pooled position."""
    n = x.shape[1]
    mask = m.attn_mask[:n, :n]  # causal mask of the first n positions
    if spec.pooled_last_block and text.shape[0] > 0:
        # The last block at the pooled (end-of-text) rows only (clipkit.models.pooled_block):
        # query p attends to keys 0..p, the causal mask's row p.
        after = torch.arange(n, device=text.device)[None, :] > rows[:, None]  # (B, n)
        x = m.ln_final(run_pooled(m.transformer, x, mask, rows, after))  # (B, width)
    else:
        x = m.transformer(x, attn_mask=mask)
        x = m.ln_final(x)
        x = text_global_pool(x, text, spec.pool_type, eos_token_id=spec.eos_id)  # (B, width)
    if m.text_projection is not None:
        x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection
    return x


def trim_right_padding(tokens: Tensor, pad_id: int) -> Tensor:
    """``tokens`` (B, L) without the trailing columns that are ``pad_id`` in every row (all of
    them while ``torch.compile`` traces: ``uncut``)."""
    if uncut():
        return tokens
    real = (tokens != pad_id).any(dim=0)  # (L,) a column holding a real token in some row
    if not bool(real.any()):
        return tokens[:, :1]
    n = int(torch.nonzero(real).max()) + 1
    return tokens[:, :n]
