"""Drivers vs CLIP_benchmark's pipeline, restated, on a tiny random open_clip model.

The reference reads the shards with webdataset exactly as CLIP_benchmark's
``build_wds_dataset`` does, batches with ``.batched(batch_size)``, and runs
``zero_shot_classifier`` / ``run_classification`` / ``zeroshot_retrieval.evaluate``'s
formulas on the raw open_clip model. clipkit's drivers see the same model through the
DualEncoder API, with ``alpha="drop"`` (CLIP_benchmark's decoding).

Embeddings are compared to ~1 ulp, not bitwise: the same batch through the same model
can differ in the last bit between two calls on CPU (BLAS kernels depend on buffer
alignment), for the reference as much as for clipkit.
"""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from test_eval_metrics import clipbench_retrieval, clipbench_zeroshot

from clipkit.evaluation import (
    ClipBenchmarkWds,
    build_classifier,
    evaluate_retrieval,
    evaluate_zeroshot,
    write_clip_benchmark_wds,
)
from clipkit.evaluation.retrieval import embed_retrieval
from clipkit.evaluation.zeroshot import zeroshot_logits

EXTS = ["webp", "png", "jpg", "jpeg"]
CLASSNAMES = ["cat", "dog", "car", "tree", "boat", "bird"]
TEMPLATES = ["a photo of a {c}.", "a blurry {c}", "art of the {c}"]
BATCH = 4


class OpenClipAdapter(torch.nn.Module):
    """An open_clip CLIP seen through the DualEncoder API."""

    def __init__(self, clip, tokenizer, transform):
        super().__init__()
        self.clip, self.tokenizer, self.transform = clip, tokenizer, transform

    def image_transform(self, train=False):
        return self.transform

    def tokenize(self, texts):
        return self.tokenizer(texts)

    def encode_image(self, image=None, image_features=None, normalize=True):
        return self.clip.encode_image(image, normalize=normalize)

    def encode_text(self, text, normalize=True):
        return self.clip.encode_text(text, normalize=normalize)


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg={"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        text_cfg={"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    ).eval()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    transform = open_clip.image_transform(32, is_train=False)
    return clip, tokenizer, transform


def noise_image(rng: np.random.Generator, i: int) -> Image.Image:
    size = (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
    if i % 5 == 4:  # some RGBA, partly transparent
        return Image.fromarray(rng.integers(0, 256, (*size[::-1], 4), dtype=np.uint8), "RGBA")
    return Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8), "RGB")


def clipbench_pipeline(root, transform, second):
    nshards = int((root / "test" / "nshards.txt").read_text())
    pattern = str(root / "test" / f"{{0..{nshards - 1}}}.tar")
    ds = wds.WebDataset(pattern, shardshuffle=False).decode(
        wds.autodecode.ImageHandler("pil", extensions=EXTS)
    )
    ds = ds.to_tuple(EXTS, second).map_tuple(transform, str.splitlines if second == "txt" else None)
    return torch.utils.data.DataLoader(ds.batched(BATCH), batch_size=None, num_workers=0)


def test_zeroshot_equals_clip_benchmark_pipeline(tmp_path, tiny_clip):
    clip, tokenizer, transform = tiny_clip
    rng = np.random.default_rng(0)
    samples = [{"image": noise_image(rng, i), "label": int(rng.integers(0, 6))} for i in range(23)]
    write_clip_benchmark_wds(tmp_path, samples, CLASSNAMES, TEMPLATES, samples_per_shard=10)

    with torch.no_grad():  # CLIP_benchmark zero_shot_classifier + run_classification
        weights = []
        for name in CLASSNAMES:
            emb = F.normalize(
                clip.encode_text(tokenizer([t.format(c=name) for t in TEMPLATES])), dim=-1
            ).mean(0)
            weights.append(emb / emb.norm())
        classifier = torch.stack(weights, dim=1)  # (D, C)
        logits, target = [], []
        for images, labels in clipbench_pipeline(tmp_path, transform, "cls"):
            logits.append(100.0 * F.normalize(clip.encode_image(images), dim=-1) @ classifier)
            target.append(torch.as_tensor(labels))
    want = clipbench_zeroshot(torch.cat(logits), torch.cat(target))

    model = OpenClipAdapter(clip, tokenizer, transform)
    ds = ClipBenchmarkWds(tmp_path, alpha="drop")
    ours = zeroshot_logits(model, ds, build_classifier(model, CLASSNAMES, TEMPLATES), batch_size=BATCH)
    torch.testing.assert_close(ours[0], torch.cat(logits), rtol=0, atol=1e-4)
    assert torch.equal(ours[1], torch.cat(target))
    got = evaluate_zeroshot(model, ds, batch_size=BATCH)
    assert list(got) == list(want)
    for k, value in want.items():
        assert got[k] == pytest.approx(value, abs=1e-12), k


def test_retrieval_equals_clip_benchmark_pipeline(tmp_path, tiny_clip):
    clip, tokenizer, transform = tiny_clip
    rng = np.random.default_rng(1)
    words = ["red", "small", "a", "photo", "dog", "of", "blue", "big", "tree"]
    samples = [
        {
            "image": noise_image(rng, i),
            "captions": [" ".join(rng.choice(words, 4)) for _ in range(int(rng.integers(1, 4)))],
        }
        for i in range(19)
    ]
    write_clip_benchmark_wds(tmp_path, samples, samples_per_shard=7)

    images, texts, t2i, start = [], [], [], 0  # CLIP_benchmark zeroshot_retrieval.evaluate
    with torch.no_grad():
        for batch_images, batch_texts in clipbench_pipeline(tmp_path, transform, "txt"):
            flat = [t for caps in batch_texts for t in caps]
            t2i += [start + i for i, caps in enumerate(batch_texts) for _ in caps]
            images.append(F.normalize(clip.encode_image(batch_images), dim=-1))
            texts.append(F.normalize(clip.encode_text(tokenizer(flat)), dim=-1))
            start += len(batch_images)
    ks = (1, 5, 10)
    want = clipbench_retrieval(torch.cat(images), torch.cat(texts), torch.tensor(t2i), ks, batch=BATCH)

    model = OpenClipAdapter(clip, tokenizer, transform)
    ds = ClipBenchmarkWds(tmp_path, alpha="drop")
    ours = embed_retrieval(model, ds, batch_size=BATCH)
    torch.testing.assert_close(ours[0], torch.cat(images), rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[1], torch.cat(texts), rtol=0, atol=1e-6)
    assert ours[2].tolist() == t2i
    got = evaluate_retrieval(model, ds, batch_size=BATCH, ks=ks)
    assert list(got) == list(want)
    for k, value in want.items():
        assert got[k] == pytest.approx(value, abs=1e-6), k  # CLIP_benchmark averages in float32
