"""Linear probe: multinomial logistic regression on frozen, L2-normalised image features.

The protocol follows CLIP_benchmark's ``linear_probe`` task (itself after CLIP, paper A.3):
features of the train / validation / test splits; a weight-decay sweep over
``logspace(-6, 2, 97)``, searched coarse to fine (7 points, then around the best with steps
8, 4, 2, 1) by validation top-1; a final fit on train + validation (train only for few-shot,
as there); metrics ``lp_acc1``, ``lp_acc5``, ``lp_mean_per_class_recall`` on the test split.

The classifier differs, by choice: CLIP_benchmark trains a ``torch.nn.Linear`` with AdamW for
a fixed number of epochs and requires CUDA; clipkit solves the same L2-regularised problem
exactly with scikit-learn's L-BFGS ``LogisticRegression`` (deterministic, no learning rate
or epochs to tune, fast on a CPU). ``weight_decay`` is the coefficient ``wd`` of
``mean cross-entropy + wd / 2 * ||W||^2`` (scikit-learn's ``C = 1 / (wd * n_train)``).

Features are cached on disk under ``<cache_dir>/<model fingerprint>/<dataset fingerprint>.npz``:
the model fingerprint hashes the image tower's weights and transform, the dataset's its
files (paths, sizes, mtimes) and options, so a change to either computes them afresh.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipkit.data.atomic import atomic_write_bytes
from clipkit.evaluation.distributed import Ranks
from clipkit.evaluation.embed import embed_dataset
from clipkit.evaluation.metrics import zeroshot_metrics
from clipkit.evaluation.source import EvalDataError

WD_GRID = np.logspace(-6, 2, num=97)  # CLIP_benchmark's grid
WD_INIT = [0, 16, 32, 48, 64, 80, 96]  # its 7 starting points: logspace(-6, 2, 7)


def cached_features(
    model: Any,
    dataset: Any,
    cache_dir: str | Path | None,
    batch_size: int = 64,
    num_workers: int = 0,
    ranks: Ranks | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D) float32 unit-norm, labels (N,) int64) of ``dataset``, cached on disk."""
    ranks = ranks or Ranks()
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / model.fingerprint() / f"{dataset.fingerprint()}.npz"
        if path.is_file():
            with np.load(path) as data:
                return data["features"], data["labels"]
    emb = embed_dataset(model, dataset, batch_size, num_workers, ranks)
    if emb.labels is None:
        raise EvalDataError(f"{dataset!r} has no labels: a linear probe needs a classification dataset")
    feats, labels = emb.image_emb.numpy().astype(np.float32), emb.labels.numpy().astype(np.int64)
    if path is not None and ranks.main:
        buf = io.BytesIO()
        np.savez(buf, features=feats, labels=labels, keys=np.array(emb.keys))
        atomic_write_bytes(path, buf.getvalue())
    return feats, labels


def fewshot_indices(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Indices of ``k`` random samples of every class (sorted); raises when a class has fewer."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < k:
            raise EvalDataError(f"few-shot k={k}: class {int(c)} has only {len(members)} training samples")
        picked.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(picked))


def stratified_split(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices): ``fraction`` of each class (at least one) held out."""
    if not 0.0 < fraction < 1.0:
        raise EvalDataError(f"validation proportion must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) > 1:
            val.append(members[: max(1, round(fraction * len(members)))])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=int)
    return np.setdiff1d(np.arange(len(labels)), val_idx), val_idx


def fit(features: np.ndarray, labels: np.ndarray, wd: float, seed: int = 0) -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1.0 / (wd * len(labels)), max_iter=1000, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(features, labels)


def logits(clf: Any, features: np.ndarray, num_classes: int) -> torch.Tensor:
    """(N, num_classes) decision values; classes absent from training get -inf."""
    scores = clf.decision_function(features)
    if scores.ndim == 1:  # two classes: scikit-learn returns the positive class's margin
        scores = np.stack([-scores, scores], axis=1) / 2
    out = np.full((len(features), num_classes), -np.inf)
    out[:, clf.classes_] = scores
    return torch.from_numpy(out)


def sweep_weight_decay(
    train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], num_classes: int, seed: int = 0
) -> tuple[float, float]:
    """(best weight decay, its validation top-1), CLIP_benchmark's coarse-to-fine search."""
    scores: dict[int, float] = {}

    def acc(i: int) -> float:
        if i not in scores:
            clf = fit(*train, float(WD_GRID[i]), seed)
            pred = logits(clf, val[0], num_classes).argmax(1).numpy()
            scores[i] = float((pred == val[1]).mean())
        return scores[i]

    def peak(candidates: list[int]) -> int:
        # CLIP_benchmark's find_peak: the first candidate with the highest accuracy > 0, else 0.
        best, best_acc = 0, 0.0
        for i in candidates:
            if acc(i) > best_acc:
                best, best_acc = i, acc(i)
        return best

    best = peak(WD_INIT)
    span = 8
    while span > 0:
        best = peak([max(best - span, 0), best, min(best + span, len(WD_GRID) - 1)])
        span //= 2
    acc(best)
    return float(WD_GRID[best]), scores[best]


def evaluate_linear_probe(
    model: Any,
    train: Any,
    test: Any,
    val: Any = None,
    val_proportion: float = 0.2,
    k_shot: int = -1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    ranks: Ranks | None = None,
) -> dict[str, float]:
    """Linear-probe metrics of ``model``: train on ``train`` (+ ``val``), report on ``test``.

    Without ``val``, ``val_proportion`` of the (few-shot) training samples, stratified, picks
    the weight decay. ``k_shot`` > 0 keeps ``k_shot`` random samples per class.
    """
    args = (cache_dir, batch_size, num_workers, ranks)
    x_tr, y_tr = cached_features(model, train, *args)
    x_te, y_te = cached_features(model, test, *args)
    num_classes = max(int(y_tr.max()), int(y_te.max())) + 1
    try:
        num_classes = max(num_classes, len(test.classnames))
    except (AttributeError, EvalDataError):
        pass  # class names are optional for a probe
    if val is None:  # hold out part of train first, then (few-shot) pick from the rest
        tr, va = stratified_split(y_tr, val_proportion, seed)
        x_va, y_va, x_fit, y_fit = x_tr[va], y_tr[va], x_tr[tr], y_tr[tr]
    else:
        x_va, y_va = cached_features(model, val, *args)
        x_fit, y_fit = x_tr, y_tr
    if len(y_va) == 0:
        raise EvalDataError("linear probe: no validation samples to choose the weight decay on")
    if k_shot > 0:
        keep = fewshot_indices(y_fit, k_shot, seed)
        x_fit, y_fit = x_fit[keep], y_fit[keep]
    wd, val_acc = sweep_weight_decay((x_fit, y_fit), (x_va, y_va), num_classes, seed)
    # As CLIP_benchmark: the final fit adds the validation samples, except in few-shot mode.
    final = (x_fit, y_fit) if k_shot > 0 else (np.concatenate([x_fit, x_va]), np.concatenate([y_fit, y_va]))
    clf = fit(*final, wd, seed)
    scores = zeroshot_metrics(logits(clf, x_te, num_classes), torch.from_numpy(y_te))
    out = {f"lp_{k}": v for k, v in scores.items()}
    out.update(weight_decay=wd, val_acc1=val_acc, fewshot_k=float(k_shot), seed=float(seed), normalized=1.0)
    return out
