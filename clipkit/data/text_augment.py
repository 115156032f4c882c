"""Caption augmentation for training: word dropout and word shuffle.

Fini et al., 2023, "Improved baselines for vision-language pre-training" augment the text side
too: each word is dropped with probability ``p`` and/or the words are put in a random order,
before tokenization (``data.word_dropout``, ``data.word_shuffle``; label smoothing, the recipe's
other text-side part, is ``loss.args.label_smoothing`` of ``clip``). Words are whitespace
separated; a caption never loses its last word. The draws of a sample come from
``(seed, epoch, key)`` alone (and, resampled, the sample's draw: a repeat is augmented anew), so a caption's augmentation does not depend on the loader
worker, the shuffle or what was read before it (a resumed stream gives the same captions).
Caption templates (``data.caption_templates``, ``clipkit.data.caption_templates``) wrap the
augmented caption afterwards.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from clipkit.config import DataConfig
from clipkit.data.caption_templates import apply_template, resolve_templates, sample_rng


def check_options(word_dropout: float) -> None:
    if not 0.0 <= word_dropout < 1.0:
        raise ValueError(f"data.word_dropout must be in [0, 1), got {word_dropout}")


def augment_caption(caption: str, word_dropout: float, word_shuffle: bool, rng: random.Random) -> str:
    """``caption`` with each word dropped with probability ``word_dropout`` (at least one kept),
    then, if ``word_shuffle``, its words in a random order; words re-joined by single spaces."""
    words = caption.split()
    if word_dropout > 0 and len(words) > 1:
        kept = [w for w in words if rng.random() >= word_dropout]
        words = kept or [words[rng.randrange(len(words))]]
    if word_shuffle:
        rng.shuffle(words)
    return " ".join(words)


def augment_captions(samples: Sequence[dict[str, Any]], cfg: DataConfig, seed: int, epoch: int) -> list[str]:
    """The captions of ``samples`` (dicts with "caption", "key" and, resampled, "draw"), augmented
    per ``cfg``: word dropout / shuffle on the raw caption, then the caption template
    (``clipkit.data.caption_templates``), each from an RNG of its own."""
    captions = [s["caption"] for s in samples]
    if cfg.word_dropout or cfg.word_shuffle:
        check_options(cfg.word_dropout)
        captions = [
            augment_caption(c, cfg.word_dropout, cfg.word_shuffle, sample_rng(seed, epoch, s, "text"))
            for c, s in zip(captions, samples)
        ]
    if cfg.caption_templates:
        templates, prob = resolve_templates(cfg.caption_templates), cfg.caption_template_prob
        captions = [
            apply_template(c, templates, prob, sample_rng(seed, epoch, s, "template"))
            for c, s in zip(captions, samples)
        ]
    return captions
