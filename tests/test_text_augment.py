"""Caption augmentation (word dropout, word shuffle): the functions, and the loader applying them."""

from __future__ import annotations

import random

import pytest
import torch
from training_helpers import write_shards

from clipkit.config import ConfigError, DataConfig, load_config
from clipkit.data.pipeline import build_loader
from clipkit.data.text_augment import augment_caption, augment_captions

CAPTION = "a small red cat sits on a green chair near the window"


def test_no_option_is_the_identity():
    assert augment_caption(CAPTION, 0.0, False, random.Random(0)) == CAPTION
    samples = [{"caption": "  two   spaces ", "key": "k"}]
    assert augment_captions(samples, DataConfig(), 0, 0) == ["  two   spaces "]  # untouched, not re-joined


def test_shuffle_permutes_the_words():
    out = augment_caption(CAPTION, 0.0, True, random.Random(1))
    assert out != CAPTION and sorted(out.split()) == sorted(CAPTION.split())


def test_dropout_keeps_a_subsequence_at_the_expected_rate_and_never_empties():
    words = CAPTION.split()
    rng = random.Random(2)
    kept = 0
    for _ in range(2000):
        out = augment_caption(CAPTION, 0.3, False, rng).split()
        it = iter(words)
        assert all(w in it for w in out)  # a subsequence: order kept
        kept += len(out)
    assert kept / (2000 * len(words)) == pytest.approx(0.7, abs=0.02)
    assert all(augment_caption("one two", 0.99, False, random.Random(s)) for s in range(200))
    assert augment_caption("alone", 0.99, True, random.Random(0)) == "alone"


def test_per_sample_draws_depend_on_seed_epoch_and_key_only():
    cfg = DataConfig(word_dropout=0.4, word_shuffle=True)
    a, b = {"caption": CAPTION, "key": "a"}, {"caption": CAPTION, "key": "b"}
    first = augment_captions([a, b], cfg, seed=3, epoch=0)
    assert augment_captions([b, a], cfg, seed=3, epoch=0) == first[::-1]  # order / batch-mates do not matter
    assert first[0] != first[1]
    assert augment_captions([a], cfg, seed=3, epoch=1) != first[:1]
    with pytest.raises(ValueError, match=r"data.word_dropout must be in \[0, 1\)"):
        augment_captions([a], DataConfig(word_dropout=1.0), 0, 0)


def test_config_keys_and_typos():
    cfg = load_config(None, ["data.word_dropout=0.1", "data.word_shuffle=true"])
    assert cfg.data.word_dropout == 0.1 and cfg.data.word_shuffle
    with pytest.raises(ConfigError, match="did you mean 'data.word_shuffle'"):
        load_config(None, ["data.word_shufle=true"])


def loader_captions(shards: str, cfg: DataConfig, train: bool, seed: int = 0) -> dict[str, str]:
    seen: dict[str, str] = {}
    captions: list[list[str]] = []

    def tokenize(texts: list[str]) -> torch.Tensor:
        captions.append(list(texts))
        return torch.zeros(len(texts), 4, dtype=torch.long)

    loader = build_loader(cfg, shards, lambda img: torch.zeros(3, 8, 8), tokenize, train=train, seed=seed)
    for batch, texts in zip(loader, iter(lambda: captions.pop(0), None)):
        seen.update(zip(batch["key"], texts))
    return seen


def test_the_loader_augments_training_captions_only_and_deterministically(tmp_path):
    shards = write_shards(tmp_path, n_shards=2, per_shard=8)
    plain = DataConfig(batch_size=4, shuffle_buffer=0)
    aug = DataConfig(batch_size=4, shuffle_buffer=0, word_shuffle=True, word_dropout=0.3)
    original = loader_captions(shards, plain, train=True)
    first = loader_captions(shards, aug, train=True)
    assert first.keys() == original.keys() and len(first) == 16
    assert first != original
    for key, text in first.items():
        assert set(text.split()) <= set(original[key].split()) and text
    assert loader_captions(shards, aug, train=True) == first  # same seed: same captions
    assert loader_captions(shards, aug, train=False) == loader_captions(shards, plain, train=False)
