"""``data filter``: exact-duplicate removal, caption rules, and DataComp-style similarity filtering with
a model whose similarities are known by construction (a colour model: the oracle)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_helpers import encode
from PIL import Image

from clipkit.cli.main import main as cli
from clipkit.data.captions import CaptionRules
from clipkit.data.filters import FilterOptions, filter_shards
from clipkit.data.shards import ShardWriter, read_sizes
from clipkit.data.tario import iter_samples
from clipkit.models.embed import SimilarityScorer

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


class ColourModel(torch.nn.Module):
    """Image embedding = mean RGB; text embedding = one-hot of the colour words it names.

    cos(red image, "red ...") ~ 0.99, cos(red image, "blue ...") ~ 0.1: the expected filter
    decisions are known without any trained weights.
    """

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def image_transform(self, train: bool = False):
        def to_tensor(im: Image.Image) -> torch.Tensor:  # (3, 8, 8) in [0, 1]
            return torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32) / 255).permute(2, 0, 1)

        return to_tensor

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return image.mean(dim=(2, 3))  # (B, 3)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[float(c in t.split()) for c in COLOURS] for t in texts])  # (B, 3)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return tokens + 1e-3


def colour_model() -> ColourModel:
    """``--model test_data_filters:colour_model`` in the CLI test."""
    return ColourModel()


def square(colour: str, shade: int = 0) -> bytes:
    r, g, b = COLOURS[colour]
    return encode(Image.new("RGB", (32, 24), (r, g + shade, b)), "PNG")


@pytest.fixture()
def shards(tmp_path):
    samples = [
        ("a", square("red"), "a red square"),
        ("b", square("green"), "a green square"),
        ("c", square("blue"), "a red square"),  # mismatched pair
        ("d", square("red"), "the same red square again"),  # exact duplicate of a
        ("e", square("green", 5), "a blue square"),  # mismatched
        ("f", square("blue", 3), "blue"),  # too short for min_words=2
        ("g", square("blue", 9), "a blue square with spam"),  # blocked word
        ("h", square("green", 7), "green green"),
    ]
    with ShardWriter(tmp_path / "in", prefix="s", maxcount=3) as w:
        for key, png, caption in samples:
            w.write({"__key__": key, "png": png, "txt": caption})
    return tmp_path


def test_dedup_and_caption_rules(shards):
    opts = FilterOptions(rules=CaptionRules(min_words=2, blocklist=frozenset({"spam"})), dedup=True)
    stats = filter_shards(str(shards / "in"), shards / "out", opts, shard_size=4)
    assert stats["removed"] == {"duplicate": 1, "caption_too_short": 1, "caption_blocked": 1}
    assert stats["kept"] == 5
    out = []
    for name in sorted(read_sizes(shards / "out")):
        with open(shards / "out" / name, "rb") as f:
            out.extend(iter_samples(f))
    assert [s["__key__"] for s in out] == ["a", "b", "c", "e", "h"]
    assert [int(s["idx"]) for s in out] == list(range(5))  # new contiguous idx, members unchanged
    assert out[2]["txt"] == b"a red square" and out[2]["png"] == square("blue")


def test_similarity_threshold_keeps_the_matching_pairs(shards):
    opts = FilterOptions(scorer=SimilarityScorer(ColourModel(), batch_size=3), min_similarity=0.5)
    stats = filter_shards(str(shards / "in"), shards / "out", opts)
    assert stats["removed"] == {"low_similarity": 2}  # c (blue image, "red"), e (green image, "blue")
    import pyarrow.parquet as pq

    rows = {r["key"]: r for r in pq.read_table(shards / "out" / "_filter_status.parquet").to_pylist()}
    assert rows["a"]["score"] > 0.95 and rows["c"]["score"] < 0.3 and rows["c"]["status"] == "low_similarity"
    assert rows["h"]["idx"] == 5 and rows["c"]["idx"] is None


def test_top_fraction_keeps_exactly_the_best_scores(shards):
    opts = FilterOptions(scorer=SimilarityScorer(ColourModel()), top_fraction=0.25)
    stats = filter_shards(str(shards / "in"), shards / "out", opts)
    assert stats["kept"] == 2  # ceil(0.25 * 8)
    import pyarrow.parquet as pq

    rows = pq.read_table(shards / "out" / "_filter_status.parquet").to_pylist()
    kept = sorted((r["score"] for r in rows if r["status"] == "ok"), reverse=True)
    dropped = [r["score"] for r in rows if r["status"] == "low_similarity"]
    assert min(kept) >= max(dropped)


def test_filter_cli_with_a_model_factory(shards, capsys):
    args = ["data", "filter", str(shards / "in"), "--out", str(shards / "out"), "--dedup",
            "--model", "test_data_filters:colour_model", "--min-similarity", "0.5"]  # fmt: skip
    assert cli(args) == 0
    assert "kept 5 of 8 samples" in capsys.readouterr().out
    stats = json.loads((shards / "out" / "_stats.json").read_text())
    assert stats["removed"] == {"low_similarity": 2, "duplicate": 1}
    assert (
        cli(["data", "filter", str(shards / "in"), "--out", str(shards / "o2"), "--top-fraction", "0.5"]) == 2
    )
    assert "need --model" in capsys.readouterr().err
