"""The suite's shared image pass: a locked image tower's outputs stored once, read by every model.

Oracle: the same suite run without a cache folder. Scores must be bit-identical, the tower must
run once per dataset for any number of models that share it, and a model whose tower is not
locked (or differs) must not read another tower's features.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from eval_helpers import wds_classification, wds_retrieval

from clipkit.config import load_config, to_dict
from clipkit.evaluation import tower_cache
from clipkit.evaluation.runner import RunOptions, run_suite
from clipkit.evaluation.suite import parse_suite
from clipkit.models import build_model
from clipkit.training import checkpoint as ckpt

TINY = [
    "model.vision.name=open_clip:clipkit-tiny-ViT",
    "model.vision.weights=",
    "model.vision.image_size=32",
    "model.vision.locked=true",
    "model.text.name=open_clip:clipkit-tiny-ViT",
    "model.text.weights=",
    "model.text.context_length=16",
    "model.projection=linear",
    "model.embed_dim=24",
]


def _run(root: Path, name: str, seed_tower: int, seed_heads: int, locked: bool = True) -> str:
    """A run folder whose tower comes from ``seed_tower`` and heads from ``seed_heads``."""
    cfg = load_config(None, [*TINY, f"model.vision.locked={str(locked).lower()}"])
    torch.manual_seed(seed_tower)
    tower = build_model(cfg.model).state_dict()
    torch.manual_seed(seed_heads)
    state = build_model(cfg.model).state_dict()
    state.update({k: v for k, v in tower.items() if k.startswith("vision.")})
    ckpt.save(root / name, 5, {"model": state, "config": to_dict(cfg)})
    return str(root / name)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("towercache")
    suite = parse_suite(
        {
            "name": "t",
            "datasets": [
                {"name": "cls", "task": "zeroshot", "path": str(wds_classification(tmp / "cls", n=21))},
                {"name": "ret", "task": "retrieval", "path": str(wds_retrieval(tmp / "ret", n=13))},
            ],
        }
    )
    models = {
        "a": _run(tmp, "a", 0, 1),
        "b": _run(tmp, "b", 0, 2),  # same tower, other heads
        "c": _run(tmp, "c", 7, 1),  # another tower
        "unlocked": _run(tmp, "u", 0, 1, locked=False),
    }
    return tmp, suite, models


def _scores(rows):
    return {(r["model"], r["dataset"], r["metric"]): r["value"] for r in rows}


def _count_tower_passes(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = tower_cache._compute

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(tower_cache, "_compute", counting)
    return calls


def test_cached_scores_are_bit_identical_and_the_tower_runs_once_per_dataset(setup, monkeypatch):
    tmp, suite, models = setup
    specs = [models["a"], models["b"], models["c"]]
    plain = run_suite(specs, suite, RunOptions(tmp / "plain", batch_size=4, report=False), log=lambda m: None)
    calls = _count_tower_passes(monkeypatch)
    opts = RunOptions(tmp / "cached", batch_size=4, cache_dir=tmp / "cache1", report=False)
    cached = run_suite(specs, suite, opts, log=lambda m: None)
    assert _scores(cached) == _scores(plain)  # exact, not approximate
    assert len(calls) == 4  # towers 0 and 7, two datasets each; model b reads model a's files
    assert len(list((tmp / "cache1" / "tower").glob("*.pt"))) == 4
    # heads differ between a and b, so the scores must too (else the test proves nothing)
    a, b = (_scores([r for r in plain if r["model"] == m]) for m in specs[:2])
    assert list(a.values()) != list(b.values())

    again = run_suite(specs, suite, opts, log=lambda m: None)
    assert len(calls) == 4  # all hits
    assert _scores(again) == _scores(plain)


def test_unlocked_tower_is_evaluated_from_pixels(setup, monkeypatch):
    tmp, suite, models = setup
    calls = _count_tower_passes(monkeypatch)
    opts = RunOptions(tmp / "u", batch_size=4, cache_dir=tmp / "cache2", report=False)
    rows = run_suite([models["unlocked"]], suite, opts, log=lambda m: None)
    plain = run_suite([models["unlocked"]], suite, RunOptions(tmp / "u2", batch_size=4, report=False))
    assert calls == [] and not (tmp / "cache2" / "tower").exists()
    assert _scores(rows) == _scores(plain)


def test_a_torn_cache_file_is_recomputed(setup, monkeypatch):
    tmp, suite, models = setup
    opts = RunOptions(tmp / "t", batch_size=4, cache_dir=tmp / "cache3", report=False)
    first = run_suite([models["a"]], suite, opts, log=lambda m: None)
    for f in (tmp / "cache3" / "tower").glob("*.pt"):
        f.write_bytes(f.read_bytes()[:100])  # a file cut short
    calls = _count_tower_passes(monkeypatch)
    second = run_suite([models["a"]], suite, opts, log=lambda m: None)
    assert len(calls) == 2 and _scores(second) == _scores(first)


def test_evaluations_that_start_together_make_one_image_pass(setup, monkeypatch, capsys):
    """Two evaluations of one locked tower at once (a sweep's --parallel runs): the second says
    whom it waits for, waits on the first's lock and reads its file. Here two threads; flock
    locks belong to each open file, so they exclude each other as two processes would."""
    tmp, suite, models = setup
    plain = run_suite(
        [models["a"]], suite, RunOptions(tmp / "p", batch_size=4, report=False), log=lambda m: None
    )
    calls: list[int] = []
    real = tower_cache._compute
    started = threading.Event()

    def slow(*args, **kw):
        calls.append(1)
        started.set()
        time.sleep(0.5)  # the other thread asks for the same features meanwhile
        return real(*args, **kw)

    monkeypatch.setattr(tower_cache, "_compute", slow)
    results: dict[str, list] = {}

    def evaluate(name: str) -> None:
        opts = RunOptions(tmp / name, batch_size=4, cache_dir=tmp / "cache_together", report=False)
        results[name] = run_suite([models["a"]], suite, opts, log=lambda m: None)

    first = threading.Thread(target=evaluate, args=("first",))
    first.start()
    assert started.wait(60)
    second = threading.Thread(target=evaluate, args=("second",))
    second.start()
    first.join(120)
    second.join(120)
    assert len(calls) == 2  # one pass per dataset, not one per thread
    assert _scores(results["first"]) == _scores(results["second"]) == _scores(plain)
    waited = [line for line in capsys.readouterr().out.splitlines() if "waiting for it to end" in line]
    assert waited and all(
        f"another clipkit process (pid {os.getpid()}) is computing the image-tower features" in line
        for line in waited
    )
    assert not list((tmp / "cache_together" / "tower").glob("*.lock"))  # released: removed


def test_key_changes_with_the_dataset_and_batch(setup):
    _tmp, suite, models = setup
    from clipkit.evaluation.runner import prepare
    from clipkit.models.specs import load_model

    model = load_model(models["a"])
    inner = tower_cache.locked_dual_encoder(model)
    assert inner is not None
    cls, ret = (prepare(e).data["test"] for e in suite.entries)
    keys = {tower_cache.cache_key(model, inner, ds, bs) for ds in (cls, ret) for bs in (4, 8)}
    assert len(keys) == 4
    assert tower_cache.locked_dual_encoder(load_model(models["unlocked"])) is None


def test_transform_signature_has_no_addresses():
    # A transform holding a plain function prints its address, which differs between processes
    # that imported in another order (a restarted sweep's forkserver): a key built from that
    # repr missed every cached tower pass after a restart.
    from torchvision import transforms as T

    from clipkit.models.adapters import transform_signature

    def to_rgb(x):
        return x

    sig = transform_signature(T.Compose([to_rgb, T.CenterCrop(4)]))
    assert "0x" not in sig and "to_rgb" in sig and "CenterCrop(size=(4, 4))" in sig
