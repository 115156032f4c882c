"""Zero-shot classification and retrieval metrics: pure functions over tensors.

The definitions follow CLIP_benchmark exactly (it is the reference the numbers are
compared with), including its tie-breaking:

- top-k accuracy (``clip_benchmark/metrics/zeroshot_classification.py::accuracy``):
  a sample is correct at k when its label is among ``logits.topk(k, sorted=True)``;
  ties are broken by ``torch.topk``.
- mean per-class recall (``balanced_accuracy_score(target, logits.argmax(1))``): the
  recall of each class *present in the labels*, averaged; the prediction is ``argmax``
  (first maximal index on ties). Classes that are predicted but never the label are
  left out, as scikit-learn does.
- retrieval recall@k (``clip_benchmark/metrics/zeroshot_retrieval.py``): scores are
  ``text_emb @ image_emb.T``. Text->image ("image_retrieval"): a text is a hit when its
  image is in ``scores[t].topk(k)``. Image->text ("text_retrieval"): an image is a hit when
  ANY of its captions is in ``scores.T[i].topk(k)``; an image without captions is a miss.
  The rule is "in torch.topk's k indices", not "fewer than k strictly higher scores": on
  exactly tied scores (an image present twice, a caption shared by two images) topk keeps
  some of the tied candidates and drops others. On the CPU it runs libstdc++'s
  ``std::partial_sort`` (when ``64 * k <= n``) or ``std::nth_element`` over ``(score, index)``
  pairs compared by score alone, so its choice is not index order (only k = 1 with
  ``n >= 64`` keeps the first maximal index) but a function of every comparison in the row:
  a tie or a near-tie that rounding flips anywhere in the row can move a hit at the top.
  The scores are therefore one matrix product, as CLIP_benchmark's: float32 rounding
  depends on the product's shape (a block of 1 or 7 rows is rounded differently from the
  whole matrix, and a 1-row product even gives two copies of one image different scores),
  and a blocked product moves hits on sets with duplicate images. Equal embeddings give
  bitwise equal rows, equal topk choices and CLIP_benchmark's hits.
  The value is the exact fraction of hits (float64); CLIP_benchmark reports the same
  fraction rounded to float32 (``.float().mean()``).

Differences, both on inputs where CLIP_benchmark fails or has no number: ``acc5`` is
left out when there are fewer than 5 classes (CLIP_benchmark stores NaN), and k larger
than the number of candidates is clamped to it (CLIP_benchmark's ``topk`` raises).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from clipkit.errors import ClipkitError


class MetricInputError(ClipkitError, ValueError):
    """Tensors of the wrong shape or range given to a metric."""


# ----------------------------------------------------------------------------- zero-shot


def _check_labels(labels: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    if labels.ndim != 1 or labels.shape[0] != n:
        raise MetricInputError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if n == 0:
        raise MetricInputError("no samples: cannot compute zero-shot metrics of an empty set")
    labels = labels.long()
    if labels.min() < 0 or labels.max() >= num_classes:
        bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
        raise MetricInputError(f"label {bad} is out of range for {num_classes} classes")
    return labels


def mean_per_class_recall(pred: torch.Tensor, labels: torch.Tensor) -> float:
    """Balanced accuracy: mean over the classes present in ``labels`` of their recall."""
    labels = labels.long().cpu()
    pred = pred.long().cpu()
    size = int(max(labels.max().item(), pred.max().item())) + 1
    counts = torch.bincount(labels, minlength=size).double()  # (size,) samples per true class
    hits = torch.bincount(labels[pred == labels], minlength=size).double()
    present = counts > 0
    return float(np.mean((hits[present] / counts[present]).numpy()))


def _metrics_from_ranking(
    topk_idx: torch.Tensor, pred: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> dict[str, float]:
    # topk_idx: (N, k) classes by decreasing score; pred: (N,) the predicted class.
    correct = topk_idx.eq(labels[:, None])  # (N, k); a label occurs at most once per row
    out = {"acc1": correct[:, :1].any(1).double().mean().item()}
    if num_classes >= 5:
        out["acc5"] = correct[:, :5].any(1).double().mean().item()
    out["mean_per_class_recall"] = mean_per_class_recall(pred, labels)
    return out


def zeroshot_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``{"acc1", "acc5", "mean_per_class_recall"}`` from (N, C) logits and (N,) labels.

    ``acc5`` only when C >= 5. Ties: ``torch.topk`` for the accuracies, first maximal
    index for the per-class recall, as CLIP_benchmark.
    """
    if logits.ndim != 2:
        raise MetricInputError(f"logits must have shape (N, C), got {tuple(logits.shape)}")
    n, num_classes = logits.shape
    labels = _check_labels(labels, n, num_classes).to(logits.device)
    # One topk call of CLIP_benchmark's size (max of its ks), so ties break as there.
    k = 5 if num_classes >= 5 else 1
    topk_idx = logits.topk(k, dim=1, largest=True, sorted=True).indices  # (N, k)
    pred = logits.argmax(dim=1)  # (N,)
    return _metrics_from_ranking(topk_idx.cpu(), pred.cpu(), labels.cpu(), num_classes)


def zeroshot_metrics_from_topk(
    topk_idx: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> dict[str, float]:
    """The same metrics from ranked class indices (N, k >= 5, or 1 when C < 5), e.g. FAISS.

    The prediction for the per-class recall is ``topk_idx[:, 0]``; this equals the
    logits path whenever the top two scores of a sample are not tied.
    """
    topk_idx = torch.as_tensor(topk_idx).long().cpu()
    need = 5 if num_classes >= 5 else 1
    if topk_idx.ndim != 2 or topk_idx.shape[1] < need:
        raise MetricInputError(f"topk_idx must have shape (N, >={need}), got {tuple(topk_idx.shape)}")
    labels = _check_labels(torch.as_tensor(labels).cpu(), topk_idx.shape[0], num_classes)
    return _metrics_from_ranking(topk_idx, topk_idx[:, 0], labels, num_classes)


def faiss_topk(queries: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product top-k of each query over ``keys`` with ``faiss.IndexFlatIP``.

    queries (N, D), keys (C, D) -> scores (N, k), indices (N, k), best first.
    """
    import faiss

    k = min(k, keys.shape[0])
    faiss.omp_set_num_threads(torch.get_num_threads())  # as many threads as torch: no oversubscription
    index = faiss.IndexFlatIP(keys.shape[1])
    index.add(np.ascontiguousarray(keys.detach().cpu().float().numpy()))
    scores, idx = index.search(np.ascontiguousarray(queries.detach().cpu().float().numpy()), k)
    return torch.from_numpy(scores), torch.from_numpy(idx).long()


# ----------------------------------------------------------------------------- retrieval


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise MetricInputError(f"recall ks must be positive integers, got {ks}")
    return ks


def _topk_idx(scores: torch.Tensor, k: int) -> torch.Tensor:
    # scores: (b, M) -> (b, min(k, M)) candidate indices, best first; one topk call per k
    # as CLIP_benchmark's recall_at_k (its k candidates among tied scores are the same).
    return scores.topk(min(k, scores.shape[1]), dim=1, largest=True, sorted=True).indices


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = 1024,
) -> dict[str, float]:
    """Recall@k both ways, ``{"image_retrieval_recall@k", "text_retrieval_recall@k"}``.

    image_emb (Ni, D), text_emb (Nt, D), text_to_image (Nt,): the image of each text.
    Scores are plain inner products (pass L2-normalised embeddings for cosine), built as
    one (Nt, Ni) product like CLIP_benchmark's (see the module docstring: a blocked product
    can round differently and move a tied hit), so memory is Nt * Ni scores. ``block_size``
    rows are ranked per ``topk`` call, which bounds its temporaries and changes no result.
    CLIP_benchmark multiplies on the CPU: pass CPU tensors for its numbers.
    """
    ks = _check_ks(ks)
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise MetricInputError(
            f"embeddings must be (Ni, D) and (Nt, D), got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    if n_img == 0 or n_txt == 0:
        raise MetricInputError(f"retrieval needs images and texts, got {n_img} images and {n_txt} texts")
    t2i = torch.as_tensor(text_to_image).long().to(image_emb.device)
    if t2i.shape != (n_txt,):
        raise MetricInputError(f"text_to_image must have shape ({n_txt},), got {tuple(t2i.shape)}")
    if t2i.min() < 0 or t2i.max() >= n_img:
        raise MetricInputError(f"text_to_image holds image indices outside [0, {n_img})")
    if block_size < 1:
        raise MetricInputError(f"block_size must be a positive number of rows, got {block_size}")
    text_emb = text_emb.to(image_emb.device, image_emb.dtype)
    scores = text_emb @ image_emb.T  # (Nt, Ni): CLIP_benchmark's one product, never blocked

    img_hits = dict.fromkeys(ks, 0)  # text -> image: texts whose image is in the top k
    for s in range(0, n_txt, block_size):
        target = t2i[s : s + block_size, None]  # (b, 1)
        for k in ks:
            img_hits[k] += int((_topk_idx(scores[s : s + block_size], k) == target).any(dim=1).sum())

    txt_hits = dict.fromkeys(ks, 0)  # image -> text: images with any caption in the top k
    for s in range(0, n_img, block_size):
        rows = scores.T[s : s + block_size]  # (b, Nt): CLIP_benchmark's `scores.T` rows, same values
        own = torch.arange(s, s + rows.shape[0], device=t2i.device)[:, None]  # (b, 1)
        for k in ks:
            txt_hits[k] += int((t2i[_topk_idx(rows, k)] == own).any(dim=1).sum())

    out: dict[str, float] = {}
    for k in ks:  # key order as CLIP_benchmark
        out[f"image_retrieval_recall@{k}"] = img_hits[k] / n_txt
        out[f"text_retrieval_recall@{k}"] = txt_hits[k] / n_img
    return out
