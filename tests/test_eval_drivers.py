"""End-to-end zero-shot and retrieval drivers with a fake DualEncoder whose answers are known.

The fake model embeds an image as its mean RGB colour and a text as the colour it names
("red", "green", "blue" or "rgb R G B"), so which class / caption wins is computable by hand.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clipkit.evaluation import (
    ClipBenchmarkWds,
    EvalDataError,
    build_classifier,
    evaluate_retrieval,
    evaluate_zeroshot,
    write_clip_benchmark_wds,
)

WORDS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
TEMPLATES = ["a photo of {c}.", "a {c} thing"]


def to_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)


class ColorModel(nn.Module):
    """DualEncoder stand-in with D = 4: (R, G, B, template marker)."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))
        self.calls: list[tuple[bool, bool]] = []  # (training, inference mode) at each encode

    def image_transform(self, train: bool = False):
        return to_tensor

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for t in texts:
            numbers = [int(x) for x in re.findall(r"\d+", t)]
            rgb = numbers[:3] if len(numbers) >= 3 else next(v for w, v in WORDS.items() if w in t)
            rows.append([*rgb, int(t.endswith("thing"))])
        return torch.tensor(rows, dtype=torch.long)  # (B, 4)

    def encode_image(self, image=None, image_features=None, normalize=True):
        self.calls.append((self.training, torch.is_inference_mode_enabled()))
        x = F.pad(image.mean(dim=(2, 3)), (0, 1)) * self.gain  # (B, 4)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text, normalize=True):
        self.calls.append((self.training, torch.is_inference_mode_enabled()))
        rgb, marker = text[:, :3].float(), text[:, 3:].float()
        # "a photo of {c}." -> 10 * colour (not unit norm); "a {c} thing" -> colour + marker axis
        x = torch.where(
            marker.bool(), torch.cat([rgb / 255, marker], 1), torch.cat([10 * rgb / 255, 0 * marker], 1)
        )
        return F.normalize(x, dim=-1) if normalize else x


def square(rgb) -> Image.Image:
    return Image.new("RGB", (6, 6), tuple(rgb))


def zeroshot_layout(root, samples_per_shard=4):
    colors = [WORDS["red"]] * 3 + [WORDS["green"]] * 3 + [WORDS["blue"]] * 3 + [(200, 90, 0)]
    labels = [0, 0, 0, 1, 1, 1, 2, 2, 0, 0]  # one blue square mislabelled red; orange is red-ish
    samples = [{"image": square(c), "label": y} for c, y in zip(colors, labels)]
    write_clip_benchmark_wds(root, samples, list(WORDS), TEMPLATES, samples_per_shard=samples_per_shard)
    return ClipBenchmarkWds(root)


def test_build_classifier_normalises_then_averages():
    w = build_classifier(ColorModel(), ["red", "blue"], TEMPLATES, batch_size=1)
    a = torch.tensor([1.0, 0, 0, 0])  # "a photo of red." normalised
    b = torch.tensor([1.0, 0, 0, 1]) / math.sqrt(2)  # "a red thing" normalised
    red = (a + b) / 2
    torch.testing.assert_close(w[0], red / red.norm())
    torch.testing.assert_close(w[1], (red / red.norm())[[2, 1, 0, 3]])
    assert w.shape == (2, 4)


def test_evaluate_zeroshot_known_answer(tmp_path):
    model = ColorModel().train()
    got = evaluate_zeroshot(model, zeroshot_layout(tmp_path), batch_size=3)
    # 10 samples, 9 correct (the mislabelled blue square is predicted blue).
    # Recall: red 4/5 (3 red + orange right, blue-labelled-red wrong), green 3/3, blue 2/2.
    assert got == pytest.approx({"acc1": 0.9, "mean_per_class_recall": (4 / 5 + 1 + 1) / 3})
    assert model.training  # restored
    assert model.calls and all(not training and inference for training, inference in model.calls)


def test_evaluate_zeroshot_workers_and_batch_size_do_not_change_result(tmp_path):
    ds = zeroshot_layout(tmp_path, samples_per_shard=3)
    base = evaluate_zeroshot(ColorModel(), ds, batch_size=128)
    assert evaluate_zeroshot(ColorModel(), ds, batch_size=1) == base
    assert evaluate_zeroshot(ColorModel(), ds, batch_size=2, num_workers=2) == base


def test_evaluate_zeroshot_errors(tmp_path):
    ds = zeroshot_layout(tmp_path / "ok")
    with pytest.raises(EvalDataError, match="has label 2 but 2 class names"):
        evaluate_zeroshot(ColorModel(), ds, classnames=["red", "green"])
    empty = tmp_path / "empty"
    write_clip_benchmark_wds(empty, [], list(WORDS), TEMPLATES)
    (empty / "test" / "0.tar").write_bytes(b"\0" * 1024)  # a valid, empty tar
    (empty / "test" / "nshards.txt").write_text("1\n")
    with pytest.raises(EvalDataError, match="yielded no samples"):
        evaluate_zeroshot(ColorModel(), ClipBenchmarkWds(empty))


def retrieval_layout(root):
    # Red has a second caption naming a greenish colour; gray has no caption.
    samples = [
        {"image": square((255, 0, 0)), "captions": ["rgb 255 0 0", "rgb 0 255 40"]},
        {"image": square((0, 255, 0)), "captions": ["rgb 0 255 0"]},
        {"image": square((0, 0, 255)), "captions": ["rgb 0 0 255"]},
        {"image": square((128, 128, 128)), "captions": []},
    ]
    write_clip_benchmark_wds(root, samples, samples_per_shard=3)
    return ClipBenchmarkWds(root)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_evaluate_retrieval_known_answer(tmp_path, batch_size):
    got = evaluate_retrieval(ColorModel(), retrieval_layout(tmp_path), batch_size=batch_size, ks=(1, 2, 10))
    # text -> image: "rgb 0 255 40" ranks green, gray, blue, red -> miss until k = 4.
    # image -> text: red, green, blue find their own caption first; gray has none.
    assert got == pytest.approx(
        {
            "image_retrieval_recall@1": 3 / 4,
            "text_retrieval_recall@1": 3 / 4,
            "image_retrieval_recall@2": 3 / 4,
            "text_retrieval_recall@2": 3 / 4,
            "image_retrieval_recall@10": 1.0,
            "text_retrieval_recall@10": 3 / 4,
        }
    )


def test_evaluate_retrieval_without_captions_fails(tmp_path):
    write_clip_benchmark_wds(tmp_path, [{"image": square((1, 2, 3)), "captions": []}])
    with pytest.raises(EvalDataError, match="no captions"):
        evaluate_retrieval(ColorModel(), ClipBenchmarkWds(tmp_path))
