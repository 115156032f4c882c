"""Linear probe: the weight-decay search against CLIP_benchmark's (restated), scikit-learn as
the solver's oracle, few-shot selection, validation splits and the on-disk feature cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_helpers import ColorModel, wds_classification

from clipkit.evaluation import linear_probe as lp
from clipkit.evaluation.dataspec import open_dataset
from clipkit.evaluation.source import EvalDataError, KeyFilter


def clipbench_search(acc: list[float]) -> int:
    """CLIP_benchmark linear_probe.evaluate's search over wd_list, restated (find_peak + spans)."""

    def find_peak(idxs):
        best_idx, max_acc = 0, 0.0
        for idx in idxs:
            if max_acc < acc[idx]:
                best_idx, max_acc = idx, acc[idx]
        return best_idx

    wd_list = np.logspace(-6, 2, num=97).tolist()
    wd_list_init = np.logspace(-6, 2, num=7).tolist()
    peak = find_peak([i for i, v in enumerate(wd_list) if v in wd_list_init])
    span = 8
    while span > 0:
        left, right = max(peak - span, 0), min(peak + span, len(wd_list) - 1)
        peak = find_peak([left, peak, right])
        span //= 2
    return peak


@pytest.mark.parametrize("seed", range(6))
def test_weight_decay_search_matches_clip_benchmark(monkeypatch, seed):
    rng = np.random.default_rng(seed)
    # Accuracies on a coarse grid (ties included), as a validation set of 40 would give.
    acc = (
        (rng.integers(0, 41, 97) / 40).tolist()
        if seed % 2
        else np.round(np.sin(np.arange(97) / 15) ** 2, 1).tolist()
    )
    assert lp.WD_INIT == [i for i, v in enumerate(lp.WD_GRID) if v in np.logspace(-6, 2, num=7).tolist()]
    monkeypatch.setattr(lp, "fit", lambda x, y, wd, seed=0: wd)
    grid = list(lp.WD_GRID)

    def fake_logits(wd, feats, c):
        i = grid.index(wd)  # validation: first acc[i] of 40 samples right
        out = torch.zeros(40, 2)
        out[: round(acc[i] * 40), 1] = 1.0
        return out

    monkeypatch.setattr(lp, "logits", fake_logits)
    val = (np.zeros((40, 1)), np.ones(40, dtype=int))
    best, val_acc = lp.sweep_weight_decay((None, None), val, 2)
    want = clipbench_search(acc)
    assert best == pytest.approx(lp.WD_GRID[want]) and val_acc == acc[want]


def test_fit_is_scikit_learn_l2_logistic_regression():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 5)), rng.integers(0, 3, 60)
    clf = lp.fit(x, y, wd=0.01)
    ref = LogisticRegression(C=1 / (0.01 * 60), max_iter=1000, random_state=0).fit(x, y)
    np.testing.assert_allclose(clf.coef_, ref.coef_)
    # Classes missing from training get -inf logits (never predicted).
    clf2 = lp.fit(x[y != 1], y[y != 1], wd=0.01)
    scores = lp.logits(clf2, x, 4)
    assert torch.isinf(scores[:, [1, 3]]).all() and torch.isfinite(scores[:, [0, 2]]).all()


def test_fewshot_and_stratified_split():
    labels = np.repeat([0, 1, 2], [5, 7, 3])
    idx = lp.fewshot_indices(labels, 3, seed=0)
    assert np.bincount(labels[idx]).tolist() == [3, 3, 3] and len(set(idx)) == 9
    assert not np.array_equal(idx, lp.fewshot_indices(labels, 3, seed=1))
    with pytest.raises(EvalDataError, match="class 2 has only 3 training samples"):
        lp.fewshot_indices(labels, 4)
    tr, va = lp.stratified_split(labels, 0.4, seed=0)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(15))
    assert np.bincount(labels[va]).tolist() == [2, 3, 1]


def test_linear_probe_end_to_end_and_feature_cache(tmp_path):
    train = open_dataset(str(wds_classification(tmp_path / "train", n=45, seed=0)))
    test = open_dataset(str(wds_classification(tmp_path / "test", n=30, seed=1)))
    model = ColorModel()
    got = lp.evaluate_linear_probe(model, train, test, cache_dir=tmp_path / "cache", batch_size=8)
    assert got["lp_acc1"] == 1.0 and got["lp_mean_per_class_recall"] == 1.0  # colours separate
    assert "lp_acc5" not in got and got["fewshot_k"] == -1 and got["weight_decay"] in lp.WD_GRID
    calls = model.image_calls
    again = lp.evaluate_linear_probe(model, train, test, cache_dir=tmp_path / "cache", batch_size=8)
    assert again == got and model.image_calls == calls  # features came from the cache
    files = list((tmp_path / "cache").rglob("*.npz"))
    assert len(files) == 2
    with torch.no_grad():
        model.gain.fill_(2.0)  # new weights -> new fingerprint -> features recomputed
    lp.evaluate_linear_probe(model, train, test, cache_dir=tmp_path / "cache", batch_size=8)
    assert model.image_calls > calls and len(list((tmp_path / "cache").rglob("*.npz"))) == 4
    few = lp.evaluate_linear_probe(ColorModel(), train, test, k_shot=5, batch_size=8)
    assert few["fewshot_k"] == 5 and few["lp_acc1"] > 0.9


def test_linear_probe_holdout_of_one_split(tmp_path):
    ds = open_dataset(str(wds_classification(tmp_path, n=60)))
    train, test = ds.filtered(KeyFilter(0.3, complement=True)), ds.filtered(KeyFilter(0.3))
    got = lp.evaluate_linear_probe(ColorModel(), train, test, val_proportion=0.25, batch_size=16)
    assert got["lp_acc1"] == 1.0
