"""Weighted mixtures (data.train="A::B", data.train_weights): sample proportions follow the weights
whatever the sources' sizes (a binomial bound), per-source counts in metrics.csv add up to the
samples seen (across a resume too), and bad weights are config errors."""

from __future__ import annotations

import csv
import itertools
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_data_resampled import png_shards, tokenize, transform
from training_helpers import tiny_tree, write_shards

from clipkit.config import Config, ConfigError, DataConfig, from_dict, load_config
from clipkit.data import build_loader
from clipkit.data.skips import DataError
from clipkit.training import checkpoint as ckpt


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[str, str]:
    """A: 1 shard of 5 samples; B: 4 shards of 20 (16x larger)."""
    out = tmp_path_factory.mktemp("mix")
    return png_shards(out / "a", "a", 5, 5), png_shards(out / "b", "b", 80, 20)


def source_counts(spec: str, weights: list[float], n: int, workers: int = 0) -> Counter:
    data = DataConfig(batch_size=10, workers=workers, shuffle_buffer=4, resampled=True, train_weights=weights)
    loader = build_loader(data, spec, transform, tokenize, train=True, seed=3)
    counts: Counter = Counter()
    for batch in itertools.islice(loader, n // data.batch_size):
        assert all(k.startswith("ab"[s]) for k, s in zip(batch["key"], batch["source"]))  # the right source
        counts.update(batch["source"])
    return counts


@pytest.mark.parametrize("weights", [[3, 1], [1, 3]])
def test_proportions_follow_the_weights_not_the_sizes(sources, weights):
    n = 1500
    p = weights[0] / sum(weights)
    counts = source_counts("::".join(sources), weights, n, workers=2)
    assert counts[0] + counts[1] == n
    assert abs(counts[0] - n * p) <= 4 * math.sqrt(n * p * (1 - p)), counts  # 4 binomial sigmas


def test_without_weights_the_parts_are_one_source(sources):
    data = DataConfig(batch_size=10, shuffle_buffer=0, resampled=True)
    loader = build_loader(data, "::".join(sources), transform, tokenize, train=True, seed=3)
    keys = [k for batch in itertools.islice(loader, 30) for k in batch["key"]]
    assert all(s == 0 for batch in itertools.islice(loader, 3) for s in batch["source"])
    # Shards are drawn uniformly: A is 1 shard of 5 among 5 shards, so ~5 / 85 of the samples.
    assert sum(k.startswith("a") for k in keys) < len(keys) / 4


def test_a_weight_count_that_does_not_fit_the_spec_is_refused_by_the_loader(sources):
    data = DataConfig(batch_size=10, resampled=True, train_weights=[1, 2, 3])
    with pytest.raises(DataError, match=r"3 weight\(s\) but the training spec has 2 '::'-separated source"):
        build_loader(data, "::".join(sources), transform, tokenize, train=True, seed=0)


# ---------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.train=a::b::c", "data.train_weights=[3,1]"], r"2 weight\(s\) but data.train has 3 '::'-sep"),
        (["data.train=a::b", "data.train_weights=[3,0]"], r"data.train_weights must be positive finite"),
        (["data.train=a::b", "data.train_weights=[3,-1]"], r"data.train_weights must be positive finite"),
        (["data.train=a::b", "data.train_weights=[3,.inf]"], r"data.train_weights must be positive finite"),
        (["data.train=a::b", "data.train_weights=[3,x]"], r"data.train_weights"),  # not a number
        (["data.train=a::b", "data.train_weights=3"], r"'data.train_weights' must be list"),
    ],
)
def test_bad_weights_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.resampled=true", *overrides])


def test_weights_without_resampling_are_a_config_error():
    with pytest.raises(ConfigError, match=r"data.train_weights needs data.resampled=true"):
        load_config(None, ["data.train=a::b", "data.train_weights=[3,1]"])
    cfg = load_config(None, ["data.train=a::b", "data.train_weights=[3,1]", "data.resampled=true"])
    assert cfg.data.train_weights == [3, 1]


# ---------------------------------------------------------------------------- metrics.csv


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_per_source_counts_in_metrics_add_up_to_samples_seen_across_a_resume(tmp_path):
    from clipkit.training.loop import train

    a = write_shards(tmp_path / "a", n_shards=1, per_shard=6, idx=True)
    b = write_shards(tmp_path / "b", n_shards=2, per_shard=20, start=10, idx=True)
    tree = tiny_tree(
        f"{a}::{b}", tmp_path, **{"data.resampled": True, "data.train_weights": [3, 1], "train.samples": 100,
                                  "train.checkpoint_every": 4, "train.keep_last": 5, "train.log_every": 2},
    )  # fmt: skip
    whole = train(from_dict(Config, tree))
    rows = metric_rows(whole)
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12, 13]
    for r in rows:
        assert int(r["samples_src0"]) + int(r["samples_src1"]) == int(r["samples_seen"]), r
        assert r["epoch"] == "0"
    assert int(rows[-1]["samples_seen"]) == 100
    assert 60 <= int(rows[-1]["samples_src0"]) <= 90  # ~3/4 of 100 from the small source A
    resumed_tree = {**tree, "train": {**tree["train"], "run_name": "resumed",
                                      "resume": str(ckpt.checkpoint_path(whole, 8))}}  # fmt: skip
    resumed = train(from_dict(Config, resumed_tree))
    again = metric_rows(resumed)
    assert [int(r["step"]) for r in again] == [10, 12, 13]
    for r, ref in zip(again, rows[-3:]):  # counts carried over from the checkpoint
        assert (r["samples_seen"], r["samples_src0"], r["samples_src1"]) == (
            ref["samples_seen"],
            ref["samples_src0"],
            ref["samples_src1"],
        )
    want, got = ckpt.load(ckpt.latest(whole))["model"], ckpt.load(ckpt.latest(resumed))["model"]
    assert all(torch.equal(want[k], got[k]) for k in want)
