"""Evaluation while training (``clipkit.training.evaluate``) and ``train.keep_best``.

The oracle: every evaluation row of metrics.csv at step S holds the numbers that ``clipkit eval``
gives for the checkpoint saved at step S (zero-shot and retrieval), and the validation loss that a
plain loop over the val shards computes with that checkpoint. The run evaluates with both towers
frozen (the image features and text features computed once, ``FeatureSet`` / text memo), so the
cached path is what is checked against the plain one. Also: evaluating does not change what the
run trains; best.pt is the checkpoint of the best row; a resumed run keeps a better best; a
keep_best metric no evaluation gives fails before any work; 2 ranks give the metrics of 1.
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from eval_helpers import wds_classification, wds_retrieval
from training_helpers import run_training, tiny_tree, write_shards

from clipkit.cli.main import main as clipkit_main
from clipkit.config import Config, ConfigError, from_dict
from clipkit.errors import ClipkitError
from clipkit.training import checkpoint as ckpt
from clipkit.training.evaluate import plan_evaluation
from clipkit.training.loop import train
from clipkit.training.metrics import MetricsLog

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL_STEPS = [4, 8, 12]  # 96 samples in steps of 8, evaluated every 32 samples


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("evaldata")
    return {
        "train": write_shards(root / "train", n_shards=3, per_shard=16),
        # 2 x 10 = batches of 8, 8, 4 (the second straddles the shards: one rank reads them in turn).
        "val": write_shards(root / "val", n_shards=2, per_shard=10, seed=1, start=10),
        "cls": str(wds_classification(root / "cls", n=30, per_shard=7)),
        "caps": str(wds_retrieval(root / "caps", n=20, per_shard=6)),
    }


def eval_tree(data: dict[str, str], out: Path, **extra: Any) -> dict[str, Any]:
    return tiny_tree(
        data["train"],
        out,
        **{
            "train.samples": 96,
            "train.checkpoint_every": 4,
            "train.keep_last": 0,
            "model.text.unlocked_layers": 0,  # both towers frozen: only the heads train
            "data.val": data["val"],
            "eval.every_samples": 32,
            "eval.zeroshot": [data["cls"]],
            "eval.retrieval": [data["caps"]],
            "eval.batch_size": 16,
            "train.keep_best": "val/loss",
            **extra,
        },
    )


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def eval_rows(run_dir: Path) -> list[dict[str, str]]:
    return [r for r in read_rows(run_dir) if r.get("eval_seconds")]


@pytest.fixture(scope="module")
def eval_run(data, tmp_path_factory) -> tuple[dict[str, Any], Path]:
    tree = eval_tree(data, tmp_path_factory.mktemp("runs"))
    return tree, train(from_dict(Config, tree))


def clipkit_eval(task: str, model: Path, dataset: str, out: Path) -> dict[str, float]:
    args = ["eval", task, "--model", str(model), "--dataset", dataset, "--batch-size", "16"]
    assert clipkit_main([*args, "--device", "cpu", "--threads", "1", "--output", str(out)]) == 0
    (result,) = out.rglob(f"*_{task}.json")
    metrics = json.loads(result.read_text())["metrics"]
    shutil.rmtree(out)
    return metrics


def test_metrics_are_clipkit_eval_of_the_checkpoint_of_the_step(eval_run, data, tmp_path):
    tree, run_dir = eval_run
    rows = eval_rows(run_dir)
    assert [int(r["step"]) for r in rows] == EVAL_STEPS
    plan = plan_evaluation(from_dict(Config, tree))
    columns = {k for k in rows[0] if "/" in k}
    assert columns == set(plan.names) | {"val/loss_i2t", "val/loss_t2i"}  # the clip loss's parts
    for row in rows:
        state = ckpt.checkpoint_path(run_dir, int(row["step"]))
        for task, name, spec in (("zeroshot", "cls", data["cls"]), ("retrieval", "caps", data["caps"])):
            want = clipkit_eval(task, state, spec, tmp_path / "out")
            got = {k.split("/")[-1]: float(v) for k, v in row.items() if k.startswith(f"{task}/{name}/")}
            assert got == want, (row["step"], task)
    # The metrics moved: the evaluations saw the model as it trained.
    assert len({r["val/loss"] for r in rows}) == len(rows)


def test_frozen_tower_features_give_the_embeddings_of_a_plain_pass(eval_run, data):
    """Bit for bit: the cached path (``FeatureSet`` images, the text memo, used twice so the
    second pass reads the memo) and ``clipkit eval``'s model on the same checkpoint."""
    from clipkit.evaluation.dataspec import open_dataset
    from clipkit.evaluation.distributed import Ranks
    from clipkit.evaluation.embed import embed_dataset
    from clipkit.evaluation.zeroshot import build_classifier
    from clipkit.models.load import load_trained
    from clipkit.models.specs import load_model
    from clipkit.training.evaluate import LiveModel, feature_set

    _, run_dir = eval_run
    state = ckpt.checkpoint_path(run_dir, 8)
    plain = load_model(str(state))
    model = load_trained(state)[0]
    live = LiveModel(model, image_features=True, text_memo={}).eval()
    for spec in (data["caps"], data["cls"]):
        ds = open_dataset(spec)
        want = embed_dataset(plain, ds, 16, texts=spec == data["caps"])
        features = feature_set(model, ds, Ranks(), 16, 0, model.vision.fingerprint())
        for _ in range(2):
            got = embed_dataset(live, features, 16, texts=spec == data["caps"])
            assert torch.equal(got.image_emb, want.image_emb) and got.keys == want.keys
            if got.text_emb is not None:
                assert torch.equal(got.text_emb, want.text_emb)
    names, prompts = ["red", "green", "blue"], ["a photo of {c}.", "a {c} thing"]
    want = build_classifier(plain, names, prompts, 16)
    for _ in range(2):
        assert torch.equal(build_classifier(live, names, prompts, 16), want)
    assert len(live.text_memo) > 20


def plain_val_loss(state: Path, cfg: Config) -> float:
    """The val loss of a checkpoint: a plain loop, the training inputs (cached tower features)."""
    from clipkit.data import build_loader
    from clipkit.losses import build_loss
    from clipkit.models.load import load_trained
    from clipkit.training.feature_cache import CACHE_DIRNAME, FeatureCache
    from clipkit.training.stream import split_inputs

    model, _, _ = load_trained(state)
    cache = FeatureCache(Path(cfg.data.val).parent / CACHE_DIRNAME / model.vision.fingerprint())
    assert len(cache) == 20
    loss_fn = build_loss(cfg.loss).eval()
    loader = build_loader(
        cfg.data, cfg.data.val, None, model.tokenize, train=False, seed=0, feature_lookup=cache
    )
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            inputs, meta = split_inputs(batch)
            total += float(loss_fn(model(inputs), inputs)["loss"]) * len(meta.keys)
            count += len(meta.keys)
    assert count == 20
    return total / count


def test_val_loss_is_the_training_loss_over_the_val_set(eval_run):
    tree, run_dir = eval_run
    cfg = from_dict(Config, tree)
    for row in eval_rows(run_dir):
        want = plain_val_loss(ckpt.checkpoint_path(run_dir, int(row["step"])), cfg)
        assert float(row["val/loss"]) == pytest.approx(want, rel=1e-9, abs=0)


def test_best_checkpoint_is_the_step_with_the_lowest_val_loss(eval_run):
    _, run_dir = eval_run
    rows = eval_rows(run_dir)
    losses = [float(r["val/loss"]) for r in rows]
    best_step = int(rows[losses.index(min(losses))]["step"])
    info = json.loads((ckpt.checkpoint_dir(run_dir) / "best.json").read_text())
    assert (info["metric"], info["value"], info["step"]) == ("val/loss", min(losses), best_step)
    assert ckpt.problem(ckpt.best_path(run_dir)) is None  # size and sha256 match the sidecar
    best, same = ckpt.load(ckpt.best_path(run_dir)), ckpt.load(ckpt.checkpoint_path(run_dir, best_step))
    assert best["step"] == best_step
    for k, v in same["model"].items():
        assert torch.equal(best["model"][k], v), k
    assert ckpt.latest(run_dir) == ckpt.checkpoint_path(run_dir, 12)  # best.pt is never "latest"
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluating_does_not_change_what_the_run_trains(eval_run, data, tmp_path):
    _, run_dir = eval_run
    plain = eval_tree(data, tmp_path, **{"train.keep_best": ""})
    plain["data"]["val"], plain["eval"] = "", {}
    other = train(from_dict(Config, plain))
    assert not eval_rows(other) and not ckpt.best_path(other).exists()
    a, b = ckpt.load(ckpt.latest(run_dir)), ckpt.load(ckpt.latest(other))
    for k, v in a["trainable"].items():
        assert torch.equal(v, b["trainable"][k]), k
    # The evaluations' loaders drew no random numbers of the run: the RNG states are the same.
    (ra,), (rb,) = a["rng"], b["rng"]
    assert torch.equal(ra["torch"], rb["torch"])
    assert (ra["python"], ra["numpy"]) == (rb["python"], rb["numpy"])
    assert [r["loss"] for r in read_rows(run_dir) if r["loss"]] == [r["loss"] for r in read_rows(other)]


@pytest.mark.parametrize("stored", [-1.0, 1e9])
def test_a_resumed_run_keeps_a_better_best(eval_run, tmp_path, stored):
    """Resume from step 4 with best.json saying ``stored``: an unbeatable -1 stays (best.pt
    untouched), a hopeless 1e9 is replaced by the resumed run's own best."""
    tree, run_dir = eval_run
    tree = json.loads(json.dumps(tree))
    tree["train"]["output_dir"] = str(tmp_path)
    shutil.copytree(run_dir, tmp_path / "run")
    side = ckpt.checkpoint_dir(tmp_path / "run") / "best.json"
    info = {**json.loads(side.read_text()), "value": stored}
    side.write_text(json.dumps(info))
    before = ckpt.best_path(tmp_path / "run").read_bytes()
    tree["train"]["resume"] = str(ckpt.checkpoint_path(tmp_path / "run", 4))
    train(from_dict(Config, tree))
    after = json.loads(side.read_text())
    rows = eval_rows(tmp_path / "run")
    assert [int(r["step"]) for r in rows] == EVAL_STEPS  # the rows after step 4 were evaluated again
    if stored < 0:
        assert after == info and ckpt.best_path(tmp_path / "run").read_bytes() == before
    else:
        resumed = {int(r["step"]): float(r["val/loss"]) for r in rows if int(r["step"]) > 4}
        assert after["value"] == min(resumed.values()) and resumed[after["step"]] == after["value"]


def test_a_keep_best_metric_no_evaluation_gives_fails_before_any_work(data, tmp_path):
    tree = eval_tree(data, tmp_path, **{"train.keep_best": "zeroshot/cls/acc9"})
    with pytest.raises(ClipkitError, match=r"'zeroshot/cls/acc9'.*zeroshot/cls/acc1.*retrieval/caps/"):
        train(from_dict(Config, tree))
    assert not (tmp_path / "run").exists()
    tree = tiny_tree(data["train"], tmp_path, **{"train.keep_best": "val/loss"})
    with pytest.raises(ClipkitError, match=r"keep_best='val/loss' needs an evaluation: set data.val"):
        train(from_dict(Config, tree))


def test_eval_dataset_lists_take_one_string(data):
    cfg = from_dict(Config, {"eval": {"zeroshot": data["cls"], "retrieval": ""}})
    assert cfg.eval.zeroshot == [data["cls"]] and cfg.eval.retrieval == []
    with pytest.raises(ConfigError, match="eval.zeroshot"):
        from_dict(Config, {"eval": {"zeroshot": [data["cls"], 3]}})


def test_metrics_log_grows_its_header_for_new_columns(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    log.write({"step": 1, "loss": 2.0})
    log.write({"step": 1, "val/loss": 3.0}, scalars={"val/loss": 3.0})
    log.write({"step": 2, "loss": 1.0})
    resumed = MetricsLog(tmp_path, resume_step=1, tensorboard=False)  # drops step 2
    resumed.write({"step": 2, "zeroshot/x/acc1": 0.5})
    with open(tmp_path / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["step", "loss", "val/loss", "zeroshot/x/acc1"]
    assert [list(r.values()) for r in rows] == [
        ["1", "2.0", "", ""],
        ["1", "", "3.0", ""],
        ["2", "", "", "0.5"],
    ]


def test_metrics_log_tensorboard_events_hold_each_row_under_its_tags(tmp_path):
    # One event per row holds all its scalars; TensorBoard's own reader must see each tag's
    # series, and a resumed run's purge must drop the steps it logs again.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path)
    log.write({"step": 1, "loss": 2.5, "lr": 1e-3, "skipped": "", "nonfinite_steps": 0})
    log.write({"step": 1, "val/loss": 3.0}, scalars={"val/loss": 3.0, "zeroshot/x/acc1": 0.25})
    log.write({"step": 2, "loss": 1.5, "lr": 2e-3, "skipped": "", "nonfinite_steps": 1})
    log.close()
    resumed = MetricsLog(tmp_path, resume_step=1)
    resumed.write({"step": 2, "loss": 1.25, "lr": 2e-3, "skipped": "", "nonfinite_steps": 0})
    resumed.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    want = {"train/loss", "train/lr", "train/nonfinite_steps", "val/loss", "zeroshot/x/acc1"}
    assert set(acc.Tags()["scalars"]) == want  # strings (skipped) are not scalars
    series = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in want}
    assert series["train/loss"] == [(1, 2.5), (2, 1.25)]  # step 2 of the first run purged
    assert series["train/nonfinite_steps"] == [(1, 0.0), (2, 0.0)]
    assert series["train/lr"] == [(1, pytest.approx(1e-3)), (2, pytest.approx(2e-3))]
    assert series["val/loss"] == [(1, 3.0)] and series["zeroshot/x/acc1"] == [(1, 0.25)]


# ---------------------------------------------------------------------------- 2 ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(tree: dict[str, Any], rank: int, world: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    run_training(tree)


def test_two_ranks_evaluate_as_one(data, tmp_path):
    """lr=1e-12 keeps the initial weights (in fp32), so both runs evaluate the same model. The val shards hold
    two batches each (no batch straddles shards); retrieval runs on data.val (eval.retrieval empty)."""
    val = write_shards(tmp_path / "val", n_shards=2, per_shard=16, seed=2, start=20)
    shards = write_shards(tmp_path / "train", n_shards=4, per_shard=8)

    def tree(name: str) -> dict[str, Any]:
        t = tiny_tree(shards, tmp_path, **{"train.samples": 32, "train.run_name": name, "optim.lr": 1e-12})
        t["data"]["val"], t["eval"] = val, {"zeroshot": [data["cls"]], "batch_size": 4}
        return t

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["training_helpers", "clipkit.training.loop"])
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(tree("two"), r, 2, port)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.time() + 120
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():  # a rank left waiting in a collective for a dead one
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    one = train(from_dict(Config, tree("one")))  # after: the runs share the feature caches
    (a,), (b,) = eval_rows(one), eval_rows(tmp_path / "two")
    keys = [k for k in a if "/" in k]
    assert {"val/loss", "zeroshot/cls/acc1", "retrieval/val/text_retrieval_recall@5"} <= set(keys)
    for k in keys:
        if k.startswith("val/"):  # the same batches, summed in another order
            assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-6), k
        else:
            assert b[k] == a[k], k
