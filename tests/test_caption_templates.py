"""Caption templates in training (data.caption_templates): per-sample draws, composition with
word dropout, early validation, and the loader applying them."""

from __future__ import annotations

import collections
import random

import pytest
from test_text_augment import loader_captions
from training_helpers import write_shards

from clipkit.config import ConfigError, DataConfig, load_config
from clipkit.data.caption_templates import apply_template, fill, resolve_templates
from clipkit.data.pipeline import build_loader
from clipkit.data.text_augment import augment_caption, augment_captions

TEMPLATES = ["an emoji of {}.", "a drawing of {c}.", "{c}, an icon", "clip art: {}"]


def samples(n: int, caption: str = "red cat") -> list[dict]:
    return [{"caption": caption, "key": f"k{i:04d}"} for i in range(n)]


def templated(caption: str, text: str) -> str:
    """The template ``text`` was made from (``caption`` put back as '{}')."""
    return text.replace(caption, "{}", 1)


def test_fill_and_both_placeholders():
    assert fill("an emoji of {}.", "a cat") == "an emoji of a cat."
    assert fill("a {c} in {{braces}}", "dog {x}") == "a dog {x} in {braces}"  # the caption is not parsed


def test_draws_depend_on_seed_epoch_and_key_only():
    cfg = DataConfig(caption_templates=TEMPLATES)
    batch = samples(40)
    first = augment_captions(batch, cfg, seed=5, epoch=0)
    assert augment_captions(batch[::-1], cfg, seed=5, epoch=0) == first[::-1]  # batch order / mates
    assert augment_captions(batch[:3], cfg, seed=5, epoch=0) == first[:3]
    assert augment_captions(batch, cfg, seed=5, epoch=1) != first  # another epoch, other templates
    assert augment_captions(batch, cfg, seed=6, epoch=0) != first
    # resampled: a repeat of a sample (its draw index) gets a draw of its own
    drawn = [dict(s, draw=[0, 7]) for s in batch]
    assert augment_captions(drawn, cfg, seed=5, epoch=0) != first
    assert {templated("red cat", t) for t in first} <= {t.replace("{c}", "{}") for t in TEMPLATES}


def test_templates_are_drawn_uniformly():
    # Exact counts for a fixed seed (a regression check on the draw), and each within 3 binomial std (27) of uniform.
    cfg = DataConfig(caption_templates=TEMPLATES)
    out = augment_captions(samples(4000), cfg, seed=0, epoch=0)
    counts = collections.Counter(templated("red cat", t) for t in out)
    assert sorted(counts) == sorted(t.replace("{c}", "{}") for t in TEMPLATES)
    assert all(abs(n - 1000) < 82 for n in counts.values()), counts
    assert [counts[t.replace("{c}", "{}")] for t in TEMPLATES] == [961, 1015, 994, 1030]


def test_prob_keeps_the_raw_caption_for_the_others():
    out = augment_captions(
        samples(4000), DataConfig(caption_templates=TEMPLATES, caption_template_prob=0.25), 0, 0
    )
    raw = sum(t == "red cat" for t in out)
    assert raw == pytest.approx(3000, abs=90)
    assert (
        augment_captions(
            samples(50), DataConfig(caption_templates=TEMPLATES, caption_template_prob=0.0), 0, 0
        )
        == ["red cat"] * 50
    )
    rng = random.Random(0)
    assert all(apply_template("x", ["<{}>"], 1.0, rng) == "<x>" for _ in range(20))


def test_composes_with_word_dropout_dropout_first_then_the_template():
    caption = "a small red cat sits on a green chair"
    batch = samples(200, caption)
    dropped = augment_captions(batch, DataConfig(word_dropout=0.4, word_shuffle=True), 1, 2)
    both = augment_captions(
        batch, DataConfig(word_dropout=0.4, word_shuffle=True, caption_templates=TEMPLATES), 1, 2
    )
    only_templates = augment_captions(batch, DataConfig(caption_templates=TEMPLATES), 1, 2)
    for d, b, t in zip(dropped, both, only_templates):
        # the same dropout draws as without templates, and the same template as without dropout:
        # the template's own words are never dropped or shuffled
        assert b == templated(caption, t).replace("{}", d, 1)
    assert dropped[0] == augment_caption(caption, 0.4, True, random.Random("1:2:k0000:text"))


@pytest.mark.parametrize(
    "bad",
    ["an emoji of a cat", "{} and {}", "a {name}", "{c", "a photo of a {0.x}"],
)
def test_a_bad_template_fails_when_the_config_is_built(bad):
    with pytest.raises(ConfigError, match="data.caption_templates: caption template") as err:
        load_config(None, [f"data.caption_templates={[bad]!r}"])
    assert repr(bad) in str(err.value)
    with pytest.raises(ConfigError, match=r"caption_template_prob must be in \[0, 1\]"):
        DataConfig(caption_templates=TEMPLATES, caption_template_prob=1.5)


def test_template_files(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("an emoji of {}.\n\n  a drawing of {c}.  \n")
    assert resolve_templates([str(path), "x {}"]) == ["an emoji of {}.", "a drawing of {c}.", "x {}"]
    cfg = load_config(None, [f"data.caption_templates={path}"])  # one string: a one-entry list
    assert cfg.data.caption_templates == [str(path)]
    (tmp_path / "bad.txt").write_text("an emoji of {}.\nno placeholder\n")
    with pytest.raises(ConfigError, match=r"bad.txt:2: caption template 'no placeholder'"):
        resolve_templates([str(tmp_path / "bad.txt")])
    with pytest.raises(ConfigError, match="template file .*missing.txt' not found"):
        resolve_templates([str(tmp_path / "missing.txt")])


def test_the_training_loader_applies_templates_and_checks_files_before_any_batch(tmp_path):
    shards = write_shards(tmp_path, n_shards=2, per_shard=8)
    plain = DataConfig(batch_size=4, shuffle_buffer=0)
    cfg = DataConfig(batch_size=4, shuffle_buffer=0, caption_templates=TEMPLATES)
    original = loader_captions(shards, plain, train=True)
    first = loader_captions(shards, cfg, train=True)
    assert first.keys() == original.keys() and len(first) == 16
    wrapped = {t.replace("{c}", "{}") for t in TEMPLATES}
    assert all(text.replace(original[k], "{}", 1) in wrapped for k, text in first.items())
    assert len({text.replace(original[k], "{}", 1) for k, text in first.items()}) > 1
    assert loader_captions(shards, cfg, train=True) == first
    assert loader_captions(shards, cfg, train=False) == loader_captions(shards, plain, train=False)
    missing = DataConfig(batch_size=4, caption_templates=[str(tmp_path / "nope.txt")])
    with pytest.raises(ConfigError, match="nope.txt' not found"):
        build_loader(missing, shards, lambda img: img, lambda t: t, train=True, seed=0)
