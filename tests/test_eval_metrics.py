"""Oracles for clipkit.evaluation.metrics: hand-computed cases, brute-force loops,
scikit-learn, and a few-line re-statement of CLIP_benchmark's metric code paths.

Ties: the brute-force loops rank with Python's stable sort (lower index first on ties),
which torch.topk does not promise, so they run on continuous random data (no ties).
The CLIP_benchmark reference calls torch.topk on the same rows as the code under test,
so it is also compared on data full of exact ties.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

from clipkit.evaluation.metrics import (
    MetricInputError,
    faiss_topk,
    mean_per_class_recall,
    retrieval_metrics,
    zeroshot_metrics,
    zeroshot_metrics_from_topk,
)

# ----------------------------------------------------------------------------- references


def clipbench_zeroshot(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """CLIP_benchmark zeroshot_classification.evaluate, single-label branch, restated."""
    n, num_classes = logits.shape
    ks = (1, 5) if num_classes >= 5 else (1,)
    ranked = logits.topk(max(ks), 1, True, True)[1].t()  # (k, N)
    correct = ranked.eq(target.view(1, -1).expand_as(ranked))
    accs = [float(correct[:k].reshape(-1).float().sum()) / n for k in ks]
    out = {"acc1": accs[0]}
    if num_classes >= 5:
        out["acc5"] = accs[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        out["mean_per_class_recall"] = balanced_accuracy_score(target, logits.argmax(axis=1))
    return out


def clipbench_retrieval(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, ks, batch: int):
    """CLIP_benchmark zeroshot_retrieval.evaluate after embedding, restated."""
    scores = txt @ img.t()  # (Nt, Ni)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), t2i] = True

    def recall(s, p, k):  # actual recall per row: true positives in top k / positives
        onehot = F.one_hot(torch.topk(s, k, dim=1)[1], num_classes=s.shape[1])  # (b, k, M)
        return (onehot * p.view(s.shape[0], 1, -1)).sum(dim=(1, 2)) / p.sum(dim=1)

    def batched(s, p, k):
        return torch.cat([recall(s[i : i + batch], p[i : i + batch], k) for i in range(0, len(s), batch)])

    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (batched(scores, positive, k) > 0).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (batched(scores.T, positive.T, k) > 0).float().mean().item()
    return out


def brute_zeroshot(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    rows, ys = logits.tolist(), labels.tolist()
    ranked = [sorted(range(len(r)), key=lambda c, r=r: -r[c]) for r in rows]
    out = {"acc1": sum(rk[0] == y for rk, y in zip(ranked, ys)) / len(ys)}
    if len(rows[0]) >= 5:
        out["acc5"] = sum(y in rk[:5] for rk, y in zip(ranked, ys)) / len(ys)
    per_class = {}
    for rk, y in zip(ranked, ys):
        per_class.setdefault(y, []).append(rk[0] == y)
    out["mean_per_class_recall"] = sum(sum(v) / len(v) for v in per_class.values()) / len(per_class)
    return out


def brute_retrieval(img, txt, t2i, ks):
    s = (txt @ img.T).tolist()  # (Nt, Ni)
    t2i = t2i.tolist()
    n_txt, n_img = len(s), len(s[0])
    out = {}
    for k in ks:
        t_hits = 0
        for t in range(n_txt):
            top = sorted(range(n_img), key=lambda i, t=t: -s[t][i])[:k]
            t_hits += t2i[t] in top
        i_hits = 0
        for i in range(n_img):
            top = sorted(range(n_txt), key=lambda t, i=i: -s[t][i])[:k]
            i_hits += any(t2i[t] == i for t in top)
        out[f"image_retrieval_recall@{k}"] = t_hits / n_txt
        out[f"text_retrieval_recall@{k}"] = i_hits / n_img
    return out


def assert_close(got: dict, want: dict, tol: float = 1e-6) -> None:
    assert list(got) == list(want)
    for k, value in want.items():
        assert got[k] == pytest.approx(value, abs=tol), k


def random_retrieval(seed: int, n_img: int = 37, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_img, d, generator=g), dim=-1)
    # 0..4 captions per image (some images have none), shuffled order of texts.
    counts = torch.randint(0, 5, (n_img,), generator=g)
    t2i = torch.repeat_interleave(torch.arange(n_img), counts)
    t2i = t2i[torch.randperm(len(t2i), generator=g)]
    txt = F.normalize(img[t2i] + 0.9 * torch.randn(len(t2i), d, generator=g), dim=-1)
    return img, txt, t2i


# ----------------------------------------------------------------------------- zero-shot


def test_zeroshot_hand_computed_three_classes():
    logits = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # label 0, predicted 0
            [0.2, 0.7, 0.1],  # label 1, predicted 1
            [0.6, 0.3, 0.1],  # label 1, predicted 0
            [0.1, 0.2, 0.7],  # label 2, predicted 2
            [0.5, 0.1, 0.4],  # label 2, predicted 0
        ]
    )
    labels = torch.tensor([0, 1, 1, 2, 2])
    got = zeroshot_metrics(logits, labels)
    # acc1 = 3/5; recalls 1/1, 1/2, 1/2 -> mean 2/3; no acc5 with 3 classes.
    assert got == pytest.approx({"acc1": 0.6, "mean_per_class_recall": 2 / 3})
    assert "acc5" not in got


def test_zeroshot_acc5_hand_computed():
    scores = torch.arange(6, 0, -1).float()  # class c has rank c (0 best)
    logits = scores.repeat(3, 1)
    labels = torch.tensor([0, 4, 5])  # ranks 0 (top-1), 4 (top-5), 5 (miss)
    got = zeroshot_metrics(logits, labels)
    assert got["acc1"] == pytest.approx(1 / 3)
    assert got["acc5"] == pytest.approx(2 / 3)
    assert got["mean_per_class_recall"] == pytest.approx(1 / 3)  # classes 0, 4, 5 -> 1, 0, 0


@pytest.mark.parametrize("seed,n,c", [(0, 200, 13), (1, 57, 5), (2, 90, 4), (3, 300, 2)])
def test_zeroshot_matches_brute_force_and_clip_benchmark(seed, n, c):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g)
    labels = torch.randint(0, c, (n,), generator=g)
    got = zeroshot_metrics(logits, labels)
    assert_close(got, brute_zeroshot(logits, labels), tol=1e-12)
    assert_close(got, clipbench_zeroshot(logits, labels), tol=1e-12)


@pytest.mark.parametrize("seed,c", [(0, 8), (1, 8), (2, 3), (3, 5)])
def test_zeroshot_ties_match_clip_benchmark(seed, c):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(0, 3, (120, c), generator=g).float()  # many exact ties
    labels = torch.randint(0, c, (120,), generator=g)
    assert_close(zeroshot_metrics(logits, labels), clipbench_zeroshot(logits, labels), tol=1e-12)


def test_mean_per_class_recall_ignores_classes_absent_from_labels():
    labels = torch.tensor([0, 0, 1, 1, 1])
    pred = torch.tensor([0, 3, 1, 3, 3])  # class 3 predicted, never a label
    assert mean_per_class_recall(pred, labels) == pytest.approx((1 / 2 + 1 / 3) / 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert mean_per_class_recall(pred, labels) == pytest.approx(balanced_accuracy_score(labels, pred))


@pytest.mark.parametrize("c", [3, 10])
def test_faiss_path_equals_torch_path(c):
    g = torch.Generator().manual_seed(c)
    img = F.normalize(torch.randn(400, 32, generator=g), dim=-1)
    weights = F.normalize(torch.randn(c, 32, generator=g), dim=-1)
    labels = torch.randint(0, c, (400,), generator=g)
    logits = 100.0 * img @ weights.T
    scores, idx = faiss_topk(img, weights, 5)
    assert torch.equal(idx, logits.topk(min(5, c), dim=1).indices)
    torch.testing.assert_close(100.0 * scores, logits.topk(min(5, c), dim=1).values, rtol=1e-5, atol=1e-4)
    assert zeroshot_metrics_from_topk(idx, labels, c) == zeroshot_metrics(logits, labels)


def test_zeroshot_bad_inputs():
    with pytest.raises(MetricInputError, match="label 7 is out of range for 3 classes"):
        zeroshot_metrics(torch.zeros(2, 3), torch.tensor([0, 7]))
    with pytest.raises(MetricInputError, match=r"labels must have shape \(2,\)"):
        zeroshot_metrics(torch.zeros(2, 3), torch.tensor([0, 1, 2]))
    with pytest.raises(MetricInputError, match="empty"):
        zeroshot_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(MetricInputError, match=r"shape \(N, >=5\)"):
        zeroshot_metrics_from_topk(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]), 10)


# ----------------------------------------------------------------------------- retrieval


def test_retrieval_hand_computed_multi_caption():
    img = torch.eye(3)  # images 0, 1, 2 on the axes
    txt = torch.tensor(
        [
            [1.0, 0.2, 0.0],  # caption of image 0, closest to image 0   -> t2i hit@1
            [0.5, 0.0, 1.0],  # caption of image 0, closest to image 2   -> miss@1, hit@2
            [0.1, 1.0, 0.0],  # caption of image 1, closest to image 1   -> hit@1
            [0.9, 0.0, 0.5],  # caption of image 2, closest to image 0   -> miss@1, hit@2
        ]
    )
    t2i = torch.tensor([0, 0, 1, 2])
    got = retrieval_metrics(img, txt, t2i, ks=(1, 2))
    # image -> text @1: image 0's best text is text 0 (own), image 1's is text 2 (own),
    # image 2's is text 1 (of image 0) -> 2/3. @2: image 2's top two are texts 1, 3 -> 3/3.
    assert got == pytest.approx(
        {
            "image_retrieval_recall@1": 2 / 4,
            "text_retrieval_recall@1": 2 / 3,
            "image_retrieval_recall@2": 4 / 4,
            "text_retrieval_recall@2": 3 / 3,
        }
    )
    assert list(got) == [
        "image_retrieval_recall@1",
        "text_retrieval_recall@1",
        "image_retrieval_recall@2",
        "text_retrieval_recall@2",
    ]


@pytest.mark.parametrize("seed", range(3))
def test_retrieval_matches_brute_force_and_clip_benchmark(seed):
    img, txt, t2i = random_retrieval(seed)
    ks = (1, 5, 10)
    got = retrieval_metrics(img, txt, t2i, ks, block_size=8)
    assert_close(got, brute_retrieval(img, txt, t2i, ks), tol=1e-12)
    assert_close(got, clipbench_retrieval(img, txt, t2i, ks, batch=8))


@pytest.mark.parametrize("seed", range(3))
def test_retrieval_ties_match_clip_benchmark(seed):
    g = torch.Generator().manual_seed(seed)
    # Small integer embeddings: exact scores with many ties, identical in any block layout.
    img = torch.randint(-1, 2, (25, 4), generator=g).float()
    t2i = torch.randint(0, 25, (60,), generator=g)
    txt = torch.randint(-1, 2, (60, 4), generator=g).float()
    got = retrieval_metrics(img, txt, t2i, (1, 5, 10), block_size=7)
    assert_close(got, clipbench_retrieval(img, txt, t2i, (1, 5, 10), batch=7))


def test_retrieval_blockwise_equals_full_matrix():
    img, txt, t2i = random_retrieval(7, n_img=150)
    full = retrieval_metrics(img, txt, t2i, block_size=10**6)
    for block in (1, 3, 64):
        assert retrieval_metrics(img, txt, t2i, block_size=block) == full


def test_retrieval_image_without_caption_is_a_miss_and_k_is_clamped():
    img = torch.eye(3)
    txt = torch.eye(3)[:2]  # image 2 has no caption
    got = retrieval_metrics(img, txt, torch.tensor([0, 1]), ks=(1, 10))
    assert got["image_retrieval_recall@1"] == 1.0
    assert got["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert got["image_retrieval_recall@10"] == 1.0  # k clamped to the 3 images
    assert got["text_retrieval_recall@10"] == pytest.approx(2 / 3)  # image 2 still misses


def test_retrieval_bad_inputs():
    img, txt = torch.eye(3), torch.eye(3)
    with pytest.raises(MetricInputError, match="outside"):
        retrieval_metrics(img, txt, torch.tensor([0, 1, 3]))
    with pytest.raises(MetricInputError, match=r"text_to_image must have shape \(3,\)"):
        retrieval_metrics(img, txt, torch.tensor([0, 1]))
    with pytest.raises(MetricInputError, match="positive integers"):
        retrieval_metrics(img, txt, torch.tensor([0, 1, 2]), ks=(0,))
    with pytest.raises(MetricInputError, match="0 texts"):
        retrieval_metrics(img, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(MetricInputError, match=r"\(Ni, D\) and \(Nt, D\)"):
        retrieval_metrics(img, torch.zeros(3, 4), torch.tensor([0, 1, 2]))


def test_metrics_return_python_floats():
    got = zeroshot_metrics(torch.randn(10, 6), torch.arange(10) % 6)
    got.update(retrieval_metrics(torch.eye(3), torch.eye(3), torch.arange(3)))
    assert all(type(v) is float for v in got.values())
    assert np.isfinite(list(got.values())).all()
