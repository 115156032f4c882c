"""Speed levers that must not change the math: text cut to the longest caption, the AdamW update
implementations, and ``train.precision=auto`` (bf16 only where the CPU computes in it)."""

from __future__ import annotations

import dataclasses
import json
import math

import open_clip
import pytest
import torch
from torch import nn

from clipkit.config import Config, ModelConfig, OptimConfig, TowerConfig, load_config
from clipkit.models.text_padding import kept_length, trim_right_padding
from clipkit.models.towers import build_tower
from clipkit.training.optim import adamw_implementation, build_optimizer, implementation_of
from clipkit.training.precision import auto_precision, cpu_flags, resolve_precision

CAPTIONS = ["a cat", "a small red dog on a wooden table", "sun", "green tree and a happy bird"]


def text_tower(name: str, context_length: int = 16):
    torch.manual_seed(0)
    return build_tower(TowerConfig(name=name, weights="", context_length=context_length), "text")


def widths_seen(module: nn.Module) -> list[int]:
    """Sequence lengths entering ``module`` (a forward pre-hook records them)."""
    seen: list[int] = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    return seen


def set_causal(tower, **changes) -> None:
    """Replace fields of ``tower``'s ``CausalText`` (a custom-text tower keeps it as
    ``causal_text``, ``ClipText`` as ``model.causal``)."""
    if tower.causal_text is not None:
        tower.causal_text = dataclasses.replace(tower.causal_text, **changes)
    else:
        tower.model.causal = dataclasses.replace(tower.model.causal, **changes)


def causal_custom_text_config(folder) -> str:
    """A custom-text open_clip config (``TextTransformer``) with the causal mask: cut like CLIP's."""
    path = folder / "tiny-causal-customtext.json"
    text = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
    vision = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}
    path.write_text(
        json.dumps({"embed_dim": 32, "custom_text": True, "vision_cfg": vision, "text_cfg": text})
    )
    return f"open_clip:{path}"


@pytest.mark.parametrize(
    "name, cut",
    [
        ("open_clip:clipkit-tiny-ViT", True),  # CLIP: causal, argmax pooling
        ("causal-customtext", True),  # TextTransformer: causal, argmax pooling
        ("open_clip:clipkit-tiny-ViT-customtext", False),  # no_causal_mask: every column matters
    ],
)
def test_causal_text_on_longest_caption_equals_full_context(name, cut, tmp_path):
    tower = text_tower(causal_custom_text_config(tmp_path) if name == "causal-customtext" else name)
    tokens = tower.tokenize(CAPTIONS)  # (4, 16), padded with zeros after the end-of-text token
    longest = int(tokens.argmax(-1).max()) + 1
    assert longest < tokens.shape[1]  # there is padding to cut
    if cut:
        set_causal(tower, packed=False)  # the padded layout, cut (packing: test_packed_text_*)
    seen = widths_seen(tower.model.transformer.resblocks[0])
    got = tower(tokens)
    assert seen == [longest if cut else tokens.shape[1]]  # the transformer's sequence length
    # Oracle: the full-context forward, open_clip's own TextTransformer.forward (custom text) or
    # ClipText without its cut (CLIP.encode_text, see test_split_open_clip_text_...).
    if hasattr(tower.model, "causal"):
        tower.model.causal = None
    want = tower.model(tokens)
    assert seen[-1] == tokens.shape[1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_cut_text_tower_gives_the_full_context_gradients():
    tower = text_tower("open_clip:clipkit-tiny-ViT")
    tokens = tower.tokenize(CAPTIONS)
    (tower(tokens) ** 2).sum().backward()
    cut = {n: p.grad.clone() for n, p in tower.named_parameters()}
    tower.zero_grad()
    tower.model.causal = None  # the full-context forward
    (tower(tokens) ** 2).sum().backward()
    for n, p in tower.named_parameters():  # equal up to float rounding, relative to the gradient's size
        assert (cut[n] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max() + 1e-7, n


def test_split_open_clip_text_equals_open_clip_encode_text():
    torch.manual_seed(0)
    clip = open_clip.create_model("clipkit-tiny-ViT", force_context_length=16)
    from clipkit.models.towers_openclip import ClipText

    text = ClipText(clip)
    tokens = open_clip.get_tokenizer("clipkit-tiny-ViT", context_length=16)(CAPTIONS)
    torch.testing.assert_close(text(tokens), clip.encode_text(tokens), atol=1e-5, rtol=0)


def test_kept_length_is_the_last_end_of_text_position():
    tokens = torch.tensor([[49406, 5, 49407, 0, 0, 0], [49406, 7, 8, 9, 49407, 0]])
    assert kept_length(tokens, "argmax", None) == 5
    assert kept_length(torch.tensor([[1, 2, 3, 0], [1, 3, 0, 0]]), "eos", 3) == 3


def test_hf_tower_on_longest_caption_equals_full_context():
    tower = build_tower(TowerConfig(name="hf:minilm", weights="bundled", context_length=32), "text").eval()
    tokens = tower.tokenize(CAPTIONS)  # (4, 32)
    trimmed = trim_right_padding(tokens, tower.pad_token_id)
    assert trimmed.shape[1] < tokens.shape[1] and torch.equal(trimmed, tokens[:, : trimmed.shape[1]])
    tower.packed = False  # Hugging Face's forward on the cut batch (packing: test_packed_minilm_*)
    seen = []
    tower.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True
    )
    with torch.no_grad():
        got = tower(tokens)
        mask = tokens != tower.pad_token_id  # oracle: the full-context forward, written out
        hidden = tower.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        m = mask.unsqueeze(-1).float()
        want = (hidden * m).sum(1) / m.sum(1)
    assert seen[0] == trimmed.shape[1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def hf_padded_mean(tower, tokens):
    """Oracle: Hugging Face's forward on the padded batch and the masked mean, written out."""
    mask = tokens != tower.pad_token_id
    hidden = tower.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def no_dropout(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    for layer in module.model.encoder.layer:
        layer.attention.self.dropout.p = 0.0


HF_CAPTIONS = [
    *CAPTIONS,
    "an emoji of grinning face with big eyes.",
    "a clip art of a red fox sitting in the snow",
]


@pytest.mark.parametrize("unlocked", [2, 6])
def test_packed_minilm_equals_hugging_face_forward_and_gradients(unlocked):
    tower = build_tower(
        TowerConfig(
            name="hf:minilm", weights="bundled", context_length=24, locked=True, unlocked_layers=unlocked
        ),
        "text",
    )
    assert tower.packed  # MiniLM is a BertModel
    no_dropout(tower)
    tower.train()
    tokens = tower.tokenize(HF_CAPTIONS)
    real = int((tokens != tower.pad_token_id).sum())
    got, got_grads, shapes = forward_backward(tower, tokens, tower.model.encoder.layer[0].intermediate)
    assert shapes == [(real, 384)]  # the first layer's feed-forward ran on the real tokens alone
    want = hf_padded_mean(tower, tokens)
    (want**2).sum().backward()
    want_grads = grads(tower)
    assert len(want_grads) == len(got_grads) > 0 and shapes[-1][:2] == tuple(tokens.shape)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # A key bias has no true gradient (softmax ignores a shift shared by a query's logits): its
    # computed one is rounding noise, so gradients are compared relative to the tower's largest.
    scale = max(g.abs().max() for g in want_grads.values())
    for n, w in want_grads.items():
        assert (got_grads[n] - w).abs().max() <= 1e-5 * w.abs().max() + 1e-6 * scale, n
    with torch.no_grad():  # evaluation: the same
        tower.eval()
        torch.testing.assert_close(tower(tokens), hf_padded_mean(tower, tokens), atol=1e-5, rtol=0)


def test_packed_minilm_applies_dropout_in_training_and_runs_under_bf16_autocast():
    tower = build_tower(TowerConfig(name="hf:minilm", weights="bundled", context_length=24), "text")
    tokens = tower.tokenize(HF_CAPTIONS)
    with torch.no_grad():
        tower.eval()
        clean = tower(tokens)
        tower.train()
        torch.manual_seed(0)
        dropped = tower(tokens)
        assert (dropped - clean).abs().max() > 1e-3  # dropout acts in the packed layers
        tower.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            packed = tower(tokens)
            tower.packed = False
            padded = tower(tokens)
    torch.testing.assert_close(packed.float(), padded.float(), atol=3e-2, rtol=3e-2)


def test_only_a_plain_bert_encoder_packs_and_checkpointing_runs_hugging_face_forward():
    from transformers import BertConfig, BertModel

    from clipkit.models.packed_hf import packable_bert

    small = {"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64, "num_hidden_layers": 2}
    assert packable_bert(BertModel(BertConfig(**small)))
    assert not packable_bert(BertModel(BertConfig(**small, is_decoder=True)))  # causal: another mask
    assert not packable_bert(BertModel(BertConfig(**small, chunk_size_feed_forward=4)))
    assert not packable_bert(nn.Linear(3, 3))
    tower = build_tower(TowerConfig(name="hf:minilm", weights="bundled", context_length=24), "text").eval()
    tokens = tower.tokenize(HF_CAPTIONS)
    calls = []
    tower.model.encoder.register_forward_pre_hook(lambda m, a: calls.append(1))  # Hugging Face's own forward
    with torch.no_grad():
        tower(tokens)
        assert calls == []
        tower.set_grad_checkpointing(True)
        tower(tokens)
    assert calls == [1]


@pytest.mark.parametrize("name", ["open_clip:clipkit-tiny-ViT", "hf:minilm"])
def test_compiled_text_tower_keeps_one_shape_and_equals_the_eager_forward(name):
    """Under torch.compile the text runs at its full context: batches whose longest captions
    differ compile once (a recompile is an error here), and the outputs equal the eager, cut
    forward's. Before, each new longest caption recompiled the graph."""
    import torch._dynamo

    tower = (
        build_tower(TowerConfig(name=name, weights="bundled", context_length=32), "text")
        if name.startswith("hf:")
        else text_tower(name, context_length=32)
    ).eval()
    batches = [tower.tokenize(CAPTIONS[i : i + 2]) for i in (0, 1, 2)]  # longest: 8, 8 and 6 words
    batches.append(tower.tokenize(["sun", "a cat"]))  # longest: 2 words
    assert len({int((b != b[0, -1]).sum(1).max()) for b in batches}) >= 2  # the cut would differ
    with torch.no_grad():
        want = [tower(b) for b in batches]
        torch._dynamo.reset()
        compiled = torch.compile(tower, backend="eager", dynamic=False)  # dynamo traces, no inductor
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = [compiled(b) for b in batches]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- last block, pooled rows


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def forward_backward(tower: nn.Module, tokens: torch.Tensor, watched: nn.Module):
    """(output, parameter gradients of sum(output**2), input shapes seen by ``watched``, which
    keeps recording after). The gradients are cleared after."""
    shapes: list[tuple[int, ...]] = []
    watched.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
    out = tower(tokens)
    (out**2).sum().backward()
    out_grads = grads(tower)
    tower.zero_grad()
    return out, out_grads, shapes


def assert_same_grads(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for n, w in want.items():  # equal up to float rounding, relative to the gradient's size
        assert (got[n] - w).abs().max() <= 1e-5 * w.abs().max() + 1e-7, n


def vit_config(folder, **vision) -> str:
    path = folder / "tiny-vit-variant.json"
    cfg = {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8, **vision}
    text = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
    path.write_text(json.dumps({"embed_dim": 32, "vision_cfg": cfg, "text_cfg": text}))
    return f"open_clip:{path}"


@pytest.mark.parametrize(
    "variant, pooled",
    [
        ({}, True),  # class-token pooling: the last block runs for the class token only
        ({"final_ln_after_pool": True}, True),
        ({"ls_init_value": 0.1}, True),  # LayerScale in the block
        ({"pool_type": "avg"}, False),  # every token is pooled: open_clip's own forward
        ({"attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2}, False),
    ],
)
@pytest.mark.parametrize("checkpointing", [False, True])
def test_vit_with_pooled_last_block_equals_open_clip_encode_image(variant, pooled, checkpointing, tmp_path):
    name = vit_config(tmp_path, **variant)
    torch.manual_seed(0)
    tower = build_tower(TowerConfig(name=name, weights="", image_size=32), "vision").train()
    assert tower.pooled_last_block is pooled
    tower.set_grad_checkpointing(checkpointing)
    rows = []
    last = tower.model.transformer.resblocks[-1]
    last.mlp.register_forward_pre_hook(lambda m, a: rows.append(tuple(a[0].shape[:2])))
    images = torch.randn(6, 3, 32, 32)
    got = tower(images)
    (got**2).sum().backward()
    got_grads = grads(tower)
    tower.zero_grad()
    # The MLP of the last block: one row per image (run again in backward under checkpointing)
    assert set(rows) == {(6, 1) if pooled else (6, 17)} and len(rows) == (2 if checkpointing else 1)
    want = tower.model(images)  # oracle: open_clip's VisionTransformer.forward (= encode_image)
    (want**2).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert_same_grads(got_grads, grads(tower))


def test_vit_pooled_last_block_keeps_the_class_token_under_patch_dropout(tmp_path):
    torch.manual_seed(0)
    tower = build_tower(
        TowerConfig(name=vit_config(tmp_path, patch_dropout=0.5), weights="", image_size=32), "vision"
    )
    tower.train()
    images = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    got = tower(images)
    torch.manual_seed(1)  # the same patches dropped
    torch.testing.assert_close(got, tower.model(images), atol=1e-5, rtol=0)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("name", ["open_clip:clipkit-tiny-ViT", "causal-customtext"])
def test_text_with_pooled_last_block_equals_the_full_forward(name, packed, tmp_path):
    # Captions of different lengths: each row's end-of-text query must see exactly its own
    # keys 0..p (the causal mask's row), not the longer captions' padding columns.
    tower = text_tower(causal_custom_text_config(tmp_path) if name == "causal-customtext" else name)
    set_causal(tower, packed=packed)
    spec = tower.causal_text or tower.model.causal
    assert spec.pooled_last_block
    tokens = tower.tokenize(CAPTIONS)
    rows = []
    blocks = tower.model.transformer.resblocks
    blocks[-1].mlp.register_forward_pre_hook(lambda m, a: rows.append(tuple(a[0].shape[:2])))
    got = tower(tokens)
    (got**2).sum().backward()
    got_grads = grads(tower)
    tower.zero_grad()
    assert rows == [(len(CAPTIONS), 1)]
    full = dataclasses.replace(spec, pooled_last_block=False, packed=False)  # oracle: every row, padded
    if tower.causal_text is not None:
        tower.causal_text = full
    else:
        tower.model.causal = full
    want = tower(tokens)
    (want**2).sum().backward()
    assert rows[-1] == (len(CAPTIONS), int(tokens.argmax(-1).max()) + 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert_same_grads(got_grads, grads(tower))


PACK_CAPTIONS = [
    *CAPTIONS,
    "a",
    "an orange cat asleep on a very old red sofa in the warm afternoon sun by the open window",
]  # the last is longer than the context: truncated, its end-of-text token at the last column


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("pooled", [True, False])
@pytest.mark.parametrize("name", ["open_clip:clipkit-tiny-ViT", "causal-customtext"])
def test_packed_text_equals_open_clip_full_context_forward_and_gradients(
    name, pooled, checkpointing, tmp_path
):
    tower = text_tower(causal_custom_text_config(tmp_path) if name == "causal-customtext" else name).train()
    spec = tower.causal_text or tower.model.causal
    assert spec.packed  # open_clip's plain blocks under its causal mask pack
    set_causal(tower, pooled_last_block=pooled)
    tower.model.transformer.grad_checkpointing = checkpointing
    tokens = tower.tokenize(PACK_CAPTIONS)  # (6, 16)
    lengths = (tokens.argmax(-1) + 1).tolist()
    assert lengths[-1] == tokens.shape[1] and min(lengths) < max(lengths)
    got, got_grads, shapes = forward_backward(tower, tokens, tower.model.transformer.resblocks[0].mlp)
    # The first block's MLP ran on the real tokens alone, one row each (again in backward when checkpointed)
    assert shapes == [(sum(lengths), tower.model.transformer.width)] * (2 if checkpointing else 1)
    # Oracle: the full-context forward, open_clip's own TextTransformer.forward (custom text) or
    # ClipText with no cut (CLIP.encode_text, test_split_open_clip_text_equals_open_clip_encode_text)
    if tower.causal_text is not None:
        tower.causal_text = None
    else:
        tower.model.causal = None
    tower.model.transformer.grad_checkpointing = False
    want = tower(tokens)
    (want**2).sum().backward()
    assert shapes[-1] == (len(PACK_CAPTIONS), tokens.shape[1], tower.model.transformer.width)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert_same_grads(got_grads, grads(tower))


def test_packed_text_under_bf16_autocast_matches_the_padded_forward():
    tower = text_tower("open_clip:clipkit-tiny-ViT").train()
    tokens = tower.tokenize(PACK_CAPTIONS)
    out = {}
    for packed in (True, False):
        set_causal(tower, packed=packed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[packed] = tower(tokens)
    assert out[True].dtype == out[False].dtype
    torch.testing.assert_close(out[True].float(), out[False].float(), atol=3e-2, rtol=3e-2)


def test_only_plain_causal_blocks_pack_and_only_on_a_cpu():
    from clipkit.models import text_padding

    tower = text_tower("open_clip:clipkit-tiny-ViT")
    m = tower.model
    assert text_padding.packable(m.transformer, m.attn_mask)
    not_causal = m.attn_mask.clone()
    not_causal[3, 1] = -math.inf  # a key masked below the diagonal: not the causal mask
    assert not text_padding.packable(m.transformer, not_causal)
    assert not text_padding.packable(m.transformer, torch.zeros_like(m.attn_mask))
    m.transformer.resblocks[1].attn.dropout = 0.1  # attention dropout: not written out
    assert not text_padding.packable(m.transformer, m.attn_mask)
    assert text_padding.causal_text_spec(m).packed is False
    m.transformer.resblocks[1].attn.dropout = 0.0
    assert text_padding.causal_text_spec(m).packed is True
    assert text_padding.packs(torch.device("cpu"))
    assert not text_padding.packs(torch.device("cuda", 0)) and not text_padding.packs("mps")


def test_length_groups_minimise_padded_tokens_plus_overhead():
    # Oracle: every split of the rows sorted by length into consecutive groups, by brute force.
    import itertools
    import random

    from clipkit.models.text_padding import length_groups

    def cost(lengths, groups, overhead):
        return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)

    rng = random.Random(0)
    for trial in range(60):
        lengths = [rng.randint(2, 12) for _ in range(rng.randint(1, 9))]
        overhead = rng.choice([0, 3, 10, 40])
        groups = length_groups(lengths, overhead)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # a partition
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        best = min(
            cost(lengths, [order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)))], overhead)
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
        )
        assert cost(lengths, groups, overhead) == best, (lengths, overhead, groups)
    assert length_groups([5, 5, 5], 0) == [[0, 1, 2]]  # equal lengths: one group whatever it costs
    assert length_groups([2, 30] * 4, 8) == [[0, 2, 4, 6], [1, 3, 5, 7]]


def test_group_overhead_scales_with_the_square_of_the_width_and_the_tiny_tower_runs_one_group():
    from clipkit.models import text_padding

    assert text_padding.group_overhead(256) == text_padding.GROUP_OVERHEAD_TOKENS
    assert text_padding.group_overhead(64) == 16 * text_padding.GROUP_OVERHEAD_TOKENS
    assert text_padding.group_overhead(512) == text_padding.GROUP_OVERHEAD_TOKENS / 4
    # 63 one-word captions and one long one: at width 256 the long row runs apart; the tiny
    # tower (width 64: a group's calls cost more than its tokens) runs them as one group.
    captions = ["sun"] * 63 + ["a small red dog on a wooden table near a big old green tree"]
    tower = text_tower("open_clip:clipkit-tiny-ViT", context_length=16)
    tokens = tower.tokenize(captions)
    lengths = (tokens.argmax(-1) + 1).tolist()
    assert len(text_padding.length_groups(lengths, text_padding.group_overhead(256))) == 2
    assert len(text_padding.length_groups(lengths, text_padding.group_overhead(64))) == 1
    set_causal(tower, packed=False)  # groups are the rule of a tower that cannot be packed
    seen = widths_seen(tower.model.transformer.resblocks[0])  # the tower itself: width 64
    tower(tokens)
    assert seen == [max(lengths)]


def test_on_a_gpu_the_text_runs_as_one_group_cut_to_its_longest_caption():
    # The group overhead is a CPU measurement; on a GPU a group's kernel launches cost more
    # than its tokens save (profiled on an H200), so every row runs in one group there.
    from clipkit.models import text_padding

    lengths = [2] * 60 + [30] * 4  # on a CPU: 496 tokens and overheads in two groups, 2,048 in one
    assert len(text_padding.length_groups(lengths, text_padding.group_overhead(256))) == 2
    assert (
        len(text_padding.length_groups(lengths, text_padding.group_overhead(256, torch.device("cpu")))) == 2
    )
    for device in (torch.device("cuda", 0), "cuda", torch.device("mps")):
        overhead = text_padding.group_overhead(256, device)
        assert overhead == math.inf
        (group,) = text_padding.length_groups(lengths, overhead)
        assert sorted(group) == list(range(len(lengths)))


def test_the_text_forward_asks_for_the_group_overhead_of_its_own_device(monkeypatch):
    from clipkit.models import text_padding

    asked = []

    def overhead(width, device=None):  # a device given: one group; none: a group per length
        asked.append(device)
        return math.inf if device is not None else 0

    monkeypatch.setattr(text_padding, "group_overhead", overhead)
    captions = ["sun"] * 7 + ["a small red dog on a wooden table near a big old green tree"]
    tower = text_tower("open_clip:clipkit-tiny-ViT", context_length=16)
    tokens = tower.tokenize(captions)
    set_causal(tower, packed=False)
    seen = widths_seen(tower.model.transformer.resblocks[0])
    tower(tokens)
    assert asked == [tokens.device] and seen == [int(tokens.argmax(-1).max()) + 1]


@pytest.mark.parametrize("overhead", [0, 10**9])
def test_text_grouped_by_length_equals_one_cut_and_keeps_the_batch_order(overhead, monkeypatch):
    from clipkit.models import text_padding

    captions = [*CAPTIONS, "a", "an orange cat asleep on a very old red sofa in the sun", "two dogs"]
    tower = text_tower("open_clip:clipkit-tiny-ViT", context_length=24)
    tokens = tower.tokenize(captions)
    set_causal(tower, packed=False)
    widths = widths_seen(tower.model.transformer.resblocks[0])
    monkeypatch.setattr(text_padding, "GROUP_OVERHEAD_TOKENS", overhead)
    monkeypatch.setattr(text_padding.length_groups, "__defaults__", (overhead,))
    got = tower(tokens)
    (got**2).sum().backward()
    got_grads = grads(tower)
    tower.zero_grad()
    lengths = (tokens.argmax(-1) + 1).tolist()
    # overhead 0: one group per distinct length, each cut to it; never split: one cut to the longest
    assert sorted(widths) == (sorted(set(lengths)) if overhead == 0 else [max(lengths)])
    want = torch.cat([tower(tokens[i : i + 1]) for i in range(len(captions))])  # each row alone
    (want**2).sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert_same_grads(got_grads, grads(tower))


# ---------------------------------------------------------------------------- AdamW


class Toy(nn.Module):
    """DualEncoder submodule names around small layers: every AdamW group (decay, no decay, lr_mult)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.vision = nn.Sequential(nn.Linear(12, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 6))
        self.text = nn.Sequential(nn.Embedding(20, 8), nn.LayerNorm(8), nn.Linear(8, 6))
        self.vision_proj = nn.Linear(6, 4)
        self.text_proj = nn.Linear(6, 4)
        self.logit_scale = nn.Parameter(torch.tensor(2.6))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        img = nn.functional.normalize(self.vision_proj(self.vision(x)), dim=-1)  # (B, 4)
        txt = nn.functional.normalize(self.text_proj(self.text(t).mean(1)), dim=-1)  # (B, 4)
        logits = self.logit_scale.exp() * img @ txt.T  # (B, B)
        return nn.functional.cross_entropy(logits, torch.arange(len(x)))


def train_toy(implementation: str, steps: int = 8) -> dict[str, torch.Tensor]:
    model = Toy()
    mcfg = ModelConfig(vision=TowerConfig(name="x:v", lr_mult=0.5), text=TowerConfig(name="x:t"))
    opt = build_optimizer(model, mcfg, OptimConfig(lr=1e-2, weight_decay=0.2, implementation=implementation))
    assert implementation_of(opt) == (implementation if implementation != "auto" else "fused")
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(6, 12, generator=gen), torch.randint(0, 20, (6, 5), generator=gen)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("implementation", ["fused", "foreach", "auto"])
def test_adamw_implementations_match_the_per_parameter_loop(implementation):
    want = train_toy("for_loop")
    got = train_toy(implementation)
    start = dict(Toy().named_parameters())
    assert all(not torch.equal(want[n], start[n]) for n in want)  # every parameter moved: a real check
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5, msg=n)


def test_auto_update_is_fused_on_cpu_and_foreach_under_a_gradient_scaler():
    params = [nn.Parameter(torch.zeros(3))]
    assert adamw_implementation("auto", params, scaler=False) == "fused"
    assert adamw_implementation("auto", params, scaler=True) == "foreach"
    with pytest.raises(ValueError, match="fp16"):
        adamw_implementation("fused", params, scaler=True)


# ---------------------------------------------------------------------------- precision=auto


def test_auto_precision_reads_the_cpu_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert "avx512_bf16" in cpu_flags(str(info))
    assert auto_precision(cpu_flags(str(info)))[0] == "bf16"
    precision, reason = auto_precision({"avx2", "avx512f"})
    assert precision == "fp32" and "avx512_bf16" in reason
    assert auto_precision({"amx_bf16"})[0] == "bf16"
    assert cpu_flags(str(tmp_path / "missing")) == set()


def test_resolve_precision_replaces_auto_and_prints_why(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("clipkit.training.precision.cpu_flags", lambda: set())
    cfg = load_config(None, ["train.precision=auto"])
    out = resolve_precision(cfg)
    assert out.train.precision == "fp32" and "train.precision=auto -> fp32" in capsys.readouterr().out
    assert dataclasses.replace(out, train=cfg.train) == cfg  # nothing else changed
    fixed = load_config(None, ["train.precision=fp16"])
    assert resolve_precision(fixed) is fixed
    assert isinstance(out, Config)
