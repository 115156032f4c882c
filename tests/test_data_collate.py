"""Collation: prepared samples -> the batch dict's model inputs and keys (shapes, dtypes, pad id)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipkit.data.collate import collate, skip_carrier

PAD, L = 7, 5


def tokenize(texts: list[str]) -> torch.Tensor:
    """int32 ids padded with PAD to L (the loader must cast, and keep the pad id)."""
    out = torch.full((len(texts), L), PAD, dtype=torch.int32)
    for i, t in enumerate(texts):
        ids = [100 + len(w) for w in t.split()][:L]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return out


def samples(n: int, features: bool = False) -> list[dict]:
    out = []
    for i in range(n):
        s = {"key": f"k{i}", "idx": i if i != 1 else -1, "caption": "a " * (i + 1)}
        if features:
            s["image_features"] = np.full(6, i, dtype=np.float32)
        else:
            s["image"] = torch.full((3, 4, 2), float(i))
        out.append(s)
    return out


def test_image_batch_shapes_dtypes_and_pad_id():
    b = collate(samples(3), tokenize)
    assert list(b) == ["image", "text", "key", "idx"]
    assert b["image"].shape == (3, 3, 4, 2) and b["image"].dtype == torch.float32
    assert torch.equal(b["image"][2], torch.full((3, 4, 2), 2.0))
    assert b["text"].shape == (3, L) and b["text"].dtype == torch.long
    assert b["text"][0].tolist() == [101, PAD, PAD, PAD, PAD]  # the tokenizer's pad id, untouched
    assert b["text"][2].tolist() == [101, 101, 101, PAD, PAD]
    assert b["key"] == ["k0", "k1", "k2"]
    assert b["idx"].dtype == torch.long and b["idx"].tolist() == [0, -1, 2]


def test_feature_batch_and_caption_override():
    b = collate(samples(2, features=True), tokenize, captions=["a bb ccc", "dddd"])
    assert list(b) == ["image_features", "text", "key", "idx"]
    assert b["image_features"].shape == (2, 6) and b["image_features"].dtype == torch.float32
    assert b["image_features"][1].tolist() == [1.0] * 6
    assert b["text"][:, :3].tolist() == [[101, 102, 103], [104, PAD, PAD]]  # the given captions


def test_a_tokenizer_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"tokenize must return \(B, L\) token ids, got shape \(2, 5\)"):
        collate(samples(3), lambda texts: tokenize(texts[:2]))


def test_skip_carrier_has_no_samples():
    b = skip_carrier({"decode_error": 2})
    assert b["key"] == [] and b["skipped"] == {"decode_error": 2}
    assert b["idx"].dtype == torch.long and b["idx"].shape == (0,)
    assert "image" not in b and "text" not in b
