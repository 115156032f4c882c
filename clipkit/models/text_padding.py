"""Text towers run on the batch's longest caption, not the full context: trailing padding is cut.

The tokenizers pad every caption to the context length (e.g. 32 or 77 tokens) while captions are
often a few tokens long; the text tower's cost grows with the padded length. Cutting the columns
that are padding in every row of the batch changes no output, for two kinds of tower:

* open_clip's causal text transformer (``CLIP.encode_text``, ``TextTransformer``) pooled at the
  end-of-text token (``argmax`` / ``eos`` pooling): under the causal mask position ``i`` attends to
  positions ``<= i`` only, so the pooled position never sees a later one. The batch is cut after
  its last pooled position; positions, the mask and pooling are sliced alike.
* Hugging Face encoders with an attention mask (pad keys get zero weight) and mean pooling over
  non-pad tokens: the cut columns are pad keys and pad rows that pooling drops.

Outputs equal the full-context forward up to float rounding (different matrix sizes sum in a
different order). A tower that could be affected (bidirectional attention, ``last`` / ``first``
pooling, a class token appended at the end) runs at the full length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

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
    return CausalText(pool, eos) if ok else None


def causal_text_forward(m: nn.Module, text: Tensor, spec: CausalText) -> Tensor:
    """``CLIP.encode_text`` (unnormalised) of open_clip's causal text encoder ``m`` on the columns
    of ``text`` (B, L) up to the batch's last pooled position; returns (B, embed_dim)."""
    n = kept_length(text, spec.pool_type, spec.eos_id)
    text = text[:, :n]  # (B, n)
    cast_dtype = m.transformer.get_cast_dtype()
    x = m.token_embedding(text).to(cast_dtype)  # (B, n, width)
    x = x + m.positional_embedding[:n].to(cast_dtype)
    x = m.transformer(x, attn_mask=m.attn_mask[:n, :n])  # causal mask of the first n positions
    x = m.ln_final(x)
    x = text_global_pool(x, text, spec.pool_type, eos_token_id=spec.eos_id)  # (B, width)
    if m.text_projection is not None:
        x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) else x @ m.text_projection
    return x


def trim_right_padding(tokens: Tensor, pad_id: int) -> Tensor:
    """``tokens`` (B, L) without the trailing columns that are ``pad_id`` in every row."""
    real = (tokens != pad_id).any(dim=0)  # (L,) a column holding a real token in some row
    if not bool(real.any()):
        return tokens[:, :1]
    n = int(torch.nonzero(real).max()) + 1
    return tokens[:, :n]
