"""A Hugging Face BERT encoder run on packed tokens: the per-token work on real tokens only.

``HFTower`` (``hf:minilm`` and other ``BertModel`` directories) mean-pools the encoder's output
over the caption's real tokens. A batch of 64 captions pads every row to its longest one: on the
demo's mixture (emoji names and clip-art titles in caption templates, context 24) 827 of the
1,536 token positions are real. Every linear layer, LayerNorm, GELU and dropout of a BERT layer
acts per token, so here they run on the real tokens alone; only self-attention sees the padded
layout, where the padding keys are masked as in Hugging Face's forward:

    h = embeddings(tokens)[real]                           (T, H): word + position + type, norm
    for each layer:
        q, k, v = query(h), key(h), value(h)               (T, H) each
        a = attention(scatter(q, k, v), key mask)[real]    (B, heads, L, d) -> (T, H)
        h1 = LayerNorm(dropout(dense(a)) + h)              BertSelfOutput
        h = LayerNorm(dropout(dense(gelu(dense(h1)))) + h1)  BertIntermediate, BertOutput
    out = sum of h over each row's tokens / their count    (B, H)

The same modules run in the same order with the same arguments, so outputs and gradients equal
Hugging Face's forward followed by the masked mean to float rounding (dropout off; with dropout on,
the masks are drawn over T tokens instead of B x L positions, the same distribution).

Only ``BertModel`` qualifies (an encoder, no cross-attention, absolute positions, feed-forward
unchunked, every layer the plain ``BertLayer``), and only on a CPU (``text_padding.packs``):
anything else, gradient checkpointing, or ``torch.compile`` tracing runs Hugging Face's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipkit.models.text_padding import real_positions, scatter_padded

_LAYER_PARTS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.self.dropout",
    "attention.output.dense",
    "attention.output.dropout",
    "attention.output.LayerNorm",
    "intermediate.dense",
    "intermediate.intermediate_act_fn",
    "output.dense",
    "output.dropout",
    "output.LayerNorm",
)


def _has(module: nn.Module, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(module, part):
            return False
        module = getattr(module, part)
    return True


def packable_bert(model: nn.Module) -> bool:
    """True for a Hugging Face ``BertModel`` whose layers ``packed_layer`` writes out."""
    cfg = getattr(model, "config", None)
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    return (
        type(model).__name__ == "BertModel"
        and cfg is not None
        and not getattr(cfg, "is_decoder", False)
        and not getattr(cfg, "add_cross_attention", False)
        and getattr(cfg, "position_embedding_type", "absolute") == "absolute"
        and not getattr(cfg, "chunk_size_feed_forward", 0)
        and bool(layers)
        and all(
            type(layer).__name__ == "BertLayer"
            and type(layer.attention.self).__name__ == "BertSelfAttention"
            and all(_has(layer, p) for p in _LAYER_PARTS)
            for layer in layers
        )
    )


def packed_layer(layer: nn.Module, h: Tensor, real: Tensor, keys: Tensor, batch: int, length: int) -> Tensor:
    """One ``BertLayer`` on packed tokens: (T, H) -> (T, H).

    ``real`` (T,) is each token's flat index in the (batch, length) padded batch, ``keys``
    (batch, 1, 1, length) True at the real positions (the keys a query may attend to).
    """
    sa = layer.attention.self
    heads, d = sa.num_attention_heads, sa.attention_head_size
    width = heads * d

    def padded(x: Tensor) -> Tensor:  # (T, width) -> (batch, heads, length, d), zeros at the padding
        return scatter_padded(x, real, batch * length).view(batch, length, heads, d).transpose(1, 2)

    q, k, v = padded(sa.query(h)), padded(sa.key(h)), padded(sa.value(h))
    p = sa.dropout.p if sa.training else 0.0
    a = F.scaled_dot_product_attention(
        q, k, v, attn_mask=keys, dropout_p=p, scale=sa.scaling
    )  # (B, heads, L, d)
    a = a.transpose(1, 2).reshape(batch * length, width).index_select(0, real)  # (T, width)
    h = layer.attention.output(a, h)  # LayerNorm(dropout(dense(a)) + h)
    return layer.output(layer.intermediate(h), h)  # LayerNorm(dropout(dense(gelu(dense(h)))) + h)


def packed_bert_mean(model: nn.Module, tokens: Tensor, mask: Tensor) -> Tensor:
    """``model(input_ids=tokens, attention_mask=mask)`` mean-pooled over ``mask``: (B, L) -> (B, H).
    Every row must hold a real token (a tokenizer's [CLS] and [SEP] always are)."""
    batch, length = tokens.shape
    x = model.embeddings(input_ids=tokens)  # (B, L, H): per position, as Hugging Face's forward
    real = real_positions(mask)  # (T,)
    h = x.reshape(batch * length, -1).index_select(0, real)  # (T, H)
    keys = mask[:, None, None, :]  # (B, 1, 1, L)
    for layer in model.encoder.layer:
        h = packed_layer(layer, h, real, keys, batch, length)
    rows = torch.arange(batch, device=tokens.device).repeat_interleave(length)[real]  # (T,) each token's row
    total = h.new_zeros(batch, h.shape[1]).index_add(0, rows, h)  # (B, H)
    count = mask.sum(1, keepdim=True).to(h.dtype)
    return total / count.clamp(min=1e-9)
