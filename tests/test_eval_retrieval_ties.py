"""Retrieval recall@k on duplicate images (exactly tied scores) equals CLIP_benchmark's.

CLIP_benchmark (``clip_benchmark/metrics/zeroshot_retrieval.py``) counts a hit when a
positive is among ``torch.topk``'s k indices of a row of one ``texts_emb @ images_emb.T``
product. Among tied scores topk's choice depends on every comparison in the row, so
clipkit's former row-blocked products (rounded differently from the whole product; a
1-row product even scores two copies of one image differently) moved hits on these sets.
The reference below restates CLIP_benchmark's ``evaluate`` after embedding, line by line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipkit.evaluation.metrics import retrieval_metrics


def clipbench_recall_at_k(scores, positive_pairs, k):
    nb_texts, nb_images = scores.shape
    topk_indices = torch.topk(scores, k, dim=1)[1]  # (b, k)
    nb_positive = positive_pairs.sum(dim=1)
    topk_indices_onehot = F.one_hot(topk_indices, num_classes=nb_images)  # (b, k, M)
    positive_pairs_reshaped = positive_pairs.view(nb_texts, 1, nb_images)
    nb_true_positive = (topk_indices_onehot * positive_pairs_reshaped).sum(dim=(1, 2))
    return nb_true_positive / nb_positive


def clipbench_batchify(func, X, Y, batch_size, *args, **kwargs):
    return torch.cat(
        [
            func(X[s : s + batch_size], Y[s : s + batch_size], *args, **kwargs)
            for s in range(0, len(X), batch_size)
        ]
    )


def clipbench_evaluate(images_emb, texts_emb, texts_image_index, recall_k_list, batch_size):
    scores = texts_emb @ images_emb.t()  # (Nt, Ni)
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(len(scores)), texts_image_index] = True
    metrics = {}
    for k in recall_k_list:
        i2t = clipbench_batchify(clipbench_recall_at_k, scores, positive_pairs, batch_size, k=k)
        t2i = clipbench_batchify(clipbench_recall_at_k, scores.T, positive_pairs.T, batch_size, k=k)
        metrics[f"image_retrieval_recall@{k}"] = (i2t > 0).float().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = (t2i > 0).float().mean().item()
    return metrics


def duplicated_set(seed: int, n_unique: int, copies: int = 2, d: int = 32):
    """Every image ``copies`` times (equal embeddings, so exactly tied scores), shuffled;
    two noisy captions per image."""
    g = torch.Generator().manual_seed(seed)
    base = F.normalize(torch.randn(n_unique, d, generator=g), dim=-1)
    img = base.repeat(copies, 1)[torch.randperm(n_unique * copies, generator=g)]  # (Ni, D)
    t2i = torch.arange(len(img)).repeat_interleave(2)  # (Nt,) two captions each
    txt = F.normalize(img[t2i] + 0.5 * torch.randn(len(t2i), d, generator=g), dim=-1)
    return img, txt, t2i


def assert_same_hits(got: dict, want: dict, n_img: int, n_txt: int) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        n = n_txt if key.startswith("image_retrieval") else n_img  # queries behind the fraction
        assert round(got[key] * n) == round(value * n), (key, got[key], value)
        assert float(np.float32(got[key])) == value, key  # CLIP_benchmark's float32 of the fraction


@pytest.mark.parametrize("block_size", [1, 7, 13, 59, 1024])
@pytest.mark.parametrize(("seed", "n_unique"), [(0, 15), (1, 15), (2, 15), (3, 120)])
def test_duplicate_images_give_clip_benchmarks_hits(seed, n_unique, block_size):
    img, txt, t2i = duplicated_set(seed, n_unique)
    ks = (1, 5, 10)
    got = retrieval_metrics(img, txt, t2i, ks, block_size=block_size)
    assert_same_hits(got, clipbench_evaluate(img, txt, t2i, ks, batch_size=64), len(img), len(txt))


def test_the_set_has_exact_ties_at_the_top():
    # The case is only a test of tie handling if some query's best candidates are tied.
    img, txt, _ = duplicated_set(0, 15)
    scores = txt @ img.T  # (Nt, Ni)
    top2 = scores.topk(2, dim=1).values
    assert (top2[:, 0] == top2[:, 1]).sum() >= 10


def test_shared_captions_give_clip_benchmarks_hits():
    # Image -> text ties: the same caption (equal text embeddings) under several images.
    g = torch.Generator().manual_seed(4)
    img = F.normalize(torch.randn(40, 16, generator=g), dim=-1)
    t2i = torch.arange(40).repeat_interleave(2)
    txt = F.normalize(img[t2i] + 0.6 * torch.randn(80, 16, generator=g), dim=-1)
    txt[1::4] = txt[1]  # every other image shares one caption: tied columns in each image's row
    ks = (1, 5, 10)
    for block_size in (1, 3, 1024):
        got = retrieval_metrics(img, txt, t2i, ks, block_size=block_size)
        assert_same_hits(got, clipbench_evaluate(img, txt, t2i, ks, batch_size=16), 40, 80)
