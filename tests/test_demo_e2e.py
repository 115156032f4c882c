"""``clipkit demo`` end to end at a small size: the README's flow, checked at every landing.

The demo's own recipe (``clipkit.cli.demo.RECIPE``: bundled EfficientNet-Lite0 + MiniLM at
160 px) on the real data in data/ (built there when missing, as ``make demo`` does; the feature
cache of the shards read is kept beside them and reused). Small: 128 training samples from the
first two shards of each training source (one per loader worker), 5 Animal-MNIST images per
class and 64 emoji val pairs; the run folder goes to tmp_path.
The full-size demo is tests/test_demo_slow.py (``make bench``).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import yaml

from clipkit.cli.demo import RECIPE, REPO, brace_list, first_shards, shrink
from clipkit.cli.main import build_parser, main
from clipkit.config import load_config
from clipkit.data.urls import expand_urls
from clipkit.training import checkpoint as ckpt

DATA = REPO / "data"
SAMPLES, PER_CLASS, PAIRS = 128, 5, 64
ROWS = [
    ("zero-shot Animal-MNIST top-1", "zeroshot", "acc1"),
    ("zero-shot Animal-MNIST top-5", "zeroshot", "acc5"),
    ("emoji text->image R@1", "retrieval", "image_retrieval_recall@1"),
    ("emoji image->text R@5", "retrieval", "text_retrieval_recall@5"),
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    """(run folder, stdout) of one small demo run."""
    out = tmp_path_factory.mktemp("demo_runs")
    printed = io.StringIO()
    # data.val= : no evaluation while training (its first pass puts the ~1,000 val images through
    # the tower, most of a small run's time); the demo's before/after scores still run
    with contextlib.redirect_stdout(printed):
        code = main(
            ["demo", "--data", str(DATA), "--samples", str(SAMPLES), "--zeroshot-per-class", str(PER_CLASS),
             "--retrieval-pairs", str(PAIRS), "--out", str(out), "train.run_name=small", "data.val="]
        )  # fmt: skip
    assert code == 0, printed.getvalue()[-3000:]
    return out / "small", printed.getvalue()


def test_the_run_folder_holds_a_trained_model_of_the_small_run(demo):
    run, _ = demo
    assert (run / "metrics.csv").is_file() and (run / "config.yaml").is_file()
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["train"]["samples"] == SAMPLES
    # every source of the recipe's mixture is cut to its first two shards, in the recipe's order
    # (one shard holds 128 samples; the recipe's 2 loader workers read one each)
    sources = [Path(p).parts[-2] for p in load_config(RECIPE).data.train.split("::")]
    parts = cfg["data"]["train"].split("::")
    assert len(parts) == len(sources) >= 1
    for part, name in zip(parts, sources, strict=True):
        shards = sorted(str(p) for p in (DATA / name / "train").glob("shard-*.tar"))
        assert expand_urls(part) == shards[:2], (part, name)
    assert cfg["model"]["vision"]["name"] == "timm:tf_efficientnet_lite0"  # the recipe itself
    last = json.loads(ckpt.sidecar_path(ckpt.latest(run)).read_text())
    assert last["samples_seen"] == SAMPLES and last["step"] == SAMPLES // cfg["data"]["batch_size"]


def test_eval_jsons_hold_metrics_in_0_1_and_the_table_prints_them(demo):
    run, printed = demo
    results = {}
    for state in ("before", "after"):
        for task in ("zeroshot", "retrieval"):
            doc = json.loads((run / f"eval_{state}_{task}.json").read_text())
            assert {"dataset", "model", "pretrained", "task", "metrics"} <= set(doc)
            assert doc["metrics"] and all(0.0 <= v <= 1.0 for v in doc["metrics"].values()), doc
            results[state, task] = doc["metrics"]
    assert f"Animal-MNIST: {10 * PER_CLASS} images" in printed and f"emoji val: {PAIRS} pairs" in printed
    assert "[3/4] training" in printed and f"run folder: {run}" in printed
    for label, task, metric in ROWS:
        line = next(row for row in printed.splitlines() if row.startswith(label))
        before, after, gain = (float(x) for x in re.findall(r"-?\d+\.\d+", line[len(label) :]))
        assert before == pytest.approx(results["before", task][metric], abs=1e-4)
        assert after == pytest.approx(results["after", task][metric], abs=1e-4)
        assert gain == pytest.approx(after - before, abs=2e-4)


def test_defaults_stay_the_full_demo():
    args = build_parser().parse_args(["demo"])
    assert (args.samples, args.retrieval_pairs, args.out, args.zeroshot_per_class) == (None, 0, None, 100)
    cfg = load_config(RECIPE)
    assert shrink(cfg, None, None) == [] and cfg.train.samples == 40_000  # benchmarks/recipes_budget.md


def test_first_shards_keeps_one_part_per_source(demo):
    train = DATA / "emoji" / "train"  # built by the demo when missing
    shards = sorted(str(p) for p in train.glob("shard-*.tar"))
    assert first_shards(str(train), 1) == shards[0]
    two = first_shards(str(train), 600)  # the first shard holds ~475
    assert two == f"{train}/shard-{{000000..000001}}.tar" and expand_urls(two) == shards[:2]
    assert first_shards(f"{train}::{train}", 600) == f"{two}::{two}"
    assert first_shards(str(train), 10**9) == str(train)  # all of it: the part as it was
    assert first_shards(str(train), 1, at_least=2) == two
    assert brace_list([f"{train}/a.tar", f"{train}/b7.tar"]) == f"{train}/{{a.tar,b7.tar}}"
    assert brace_list(["/x/s-01.tar", "/x/s-03.tar"]) == "/x/{s-01.tar,s-03.tar}"  # not in a row
    assert brace_list(["/x/a.tar", "/y/b.tar"]) == "{/x/a.tar,/y/b.tar}"
