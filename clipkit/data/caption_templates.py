"""Caption templates in training: ``data.caption_templates`` wraps each training caption in a
template drawn per sample ("an emoji of {}.", "a drawing of {c}."), so that training captions
look like the prompts that zero-shot classification uses at test time (CLIP's "a photo of a
{c}." and the like).

``data.caption_templates`` is a list whose entries are templates (``{}`` or ``{c}`` marks the
caption; write ``{{`` / ``}}`` for literal braces) or, for an entry ending in ``.txt`` without
braces, a file of templates, one per line (blank lines skipped). ``data.caption_template_prob``
is the probability that a sample is templated; the others keep their raw caption.

The draw of a sample comes from ``(seed, epoch, key)`` alone (and, resampled, the sample's draw
index: a repeat may get another template), from an RNG of its own, so templates do not change
the word-dropout / shuffle draws of ``clipkit.data.text_augment``. Order: word dropout and
shuffle act on the raw caption first, then the template wraps the result, so the template's
own words ("an emoji of") are never dropped or shuffled.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from clipkit.config import ConfigError, caption_template_error, is_template_file


@functools.lru_cache(maxsize=8)
def _resolve(entries: tuple[str, ...]) -> tuple[str, ...]:
    templates: list[str] = []
    for entry in entries:
        if not is_template_file(entry):
            templates.append(entry)  # inline: checked when the config was built
            continue
        path = Path(entry)
        if not path.is_file():
            raise ConfigError(
                f"data.caption_templates: template file '{entry}' not found (an entry ending in .txt "
                "is a file with one template per line; inline templates need '{}' or '{c}')"
            )
        lines = path.read_text(encoding="utf-8").splitlines()
        numbered = [(i, line.strip()) for i, line in enumerate(lines, 1) if line.strip()]
        if not numbered:
            raise ConfigError(f"data.caption_templates: template file '{entry}' holds no template")
        for lineno, template in numbered:
            if err := caption_template_error(template):
                raise ConfigError(f"data.caption_templates: {entry}:{lineno}: {err}")
        templates.extend(t for _, t in numbered)
    return tuple(templates)


def resolve_templates(entries: list[str]) -> list[str]:
    """The templates of ``data.caption_templates``: inline entries as they are, files read (once
    per process); a bad file or line raises ``ConfigError`` naming it."""
    return list(_resolve(tuple(entries)))


def fill(template: str, caption: str) -> str:
    """``template`` with ``caption`` in its ``{}`` / ``{c}`` field."""
    return template.format(caption, c=caption)


def sample_rng(seed: int, epoch: int, sample: Mapping[str, Any], stream: str) -> random.Random:
    """The RNG of one sample's ``stream`` ("text", "template"): from (seed, epoch, key) and,
    resampled, the sample's draw, never from what the worker read before it."""
    draw = f":{sample['draw']}" if "draw" in sample else ""
    return random.Random(f"{seed}:{epoch}:{sample['key']}:{stream}{draw}")


def apply_template(caption: str, templates: list[str], prob: float, rng: random.Random) -> str:
    """``caption`` in a template drawn uniformly from ``templates`` with probability ``prob``;
    otherwise ``caption`` unchanged (one draw of ``rng`` decides, one more picks)."""
    if prob < 1.0 and rng.random() >= prob:
        return caption
    return fill(templates[rng.randrange(len(templates))], caption)
