"""Data-parallel training is the same model: 2 ranks (gloo, CPU) with per-rank batch B/2 end with
the weights of 1 rank with batch B, and a 2-rank run SIGKILLed mid-run resumes bit-identical.

Why both runs see the same global batches. The shards hold B/2 samples each and the sample
shuffle buffer is off. A pass's shard order is the same for any number of ranks (seeded by seed
and epoch, ``clipkit.data.assign``) and rank r reads shards r, r + W, ... of it, so rank r's k-th
batch is shard 2k + r, and the global batch k (the ranks' batches in rank order, as
``clipkit.losses.gather`` concatenates them) is shards 2k, 2k + 1: the single rank's k-th batch
of B, in the same order. Random crops are seeded per sample (seed, epoch, shard, sample number),
not per rank. Each run's sample log proves the premise before the weights are compared.

What is compared, for ``clip``, ``siglip``, ``siglip_tiled`` (ring exchange, several tiles) and a
locked vision tower trained on the feature cache: the final weights (within 1e-5; the weights
moved by far more over the last steps), and per step the loss (the mean over ranks of the rank
losses is the global-batch loss) and the global gradient norm. Adam is nearly blind to a constant
gradient scale, so the gradient norm is what catches a loss or gradient scaled by the world size.

The runs are child processes forked from a forkserver that has already imported clipkit (a
fresh interpreter needs ~6 s). A rank is such a child with torchrun's environment (RANK,
WORLD_SIZE, MASTER_ADDR, ...); the two-node check uses two real ``torchrun`` launches joined by
c10d rendezvous on 127.0.0.1.
"""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from dist_helpers import free_port
from training_helpers import run_training, tiny_tree, write_shards

from clipkit.training import checkpoint as ckpt
from clipkit.training.sample_log import last_step_since_resume, read_sample_log, sample_log_path

ROOT = Path(__file__).resolve().parent.parent
B, N_SHARDS = 8, 8  # shards of B/2 samples: an epoch is 4 global batches
STEPS = 6  # 1.5 epochs: the second pass's shard order must agree too
TOL = 1e-5
TIMEOUT_S = 120

# The tiny open_clip model of train/tiny_openclip.yaml, both towers trained, random crops.
OPEN = {
    "model.vision.locked": False,
    "model.vision.augment": True,
    "model.text.locked": False,
    "model.text.unlocked_layers": 0,
    "model.projection": "none",
    "model.embed_dim": 32,
}
SIGLIP_INIT = {"model.init_logit_scale": 2.302585, "model.init_logit_bias": -10.0}
CASES: dict[str, dict[str, Any]] = {
    "clip": {**OPEN, "loss.name": "clip"},
    "siglip": {**OPEN, **SIGLIP_INIT, "loss.name": "siglip"},
    "siglip_tiled_ring": {
        **OPEN,
        **SIGLIP_INIT,
        "loss.name": "siglip_tiled",
        "loss.args": {"dist_impl": "ring", "tile_size": 3},  # 4 rows per rank: tiles of 3 and 1
    },
    # tiny_tree's default: locked vision tower (feature cache on), top 2 text blocks train.
    "locked_cached": {"loss.name": "clip", "loss.args": {"local_loss": True}},
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=N_SHARDS, per_shard=B // 2, idx=True)


@pytest.fixture(scope="module")
def forkserver():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["training_helpers", "clipkit.training.loop"])
    return ctx


@pytest.fixture(scope="module")
def one_rank(shards, forkserver, tmp_path_factory):
    """case -> the run folder of its 1-rank run with batch B (trained once, when first asked)."""
    out, done = tmp_path_factory.mktemp("one_rank"), {}

    def get(case: str) -> Path:
        if case not in done:
            done[case] = train(forkserver, tree_of(shards, out, case, B, **CASES[case]), world=1)
        return done[case]

    return get


def tree_of(shards: str, out: Path, name: str, batch: int, **extra: Any) -> dict[str, Any]:
    return tiny_tree(
        shards,
        out,
        **{
            "data.batch_size": batch,
            "data.shuffle_buffer": 0,
            "train.samples": STEPS * B,
            "train.run_name": name,
            "train.deterministic": True,
            "train.threads": 1,
            "train.log_every": 1,
            "train.checkpoint_every": 3,
            "train.keep_last": 3,
            "train.log_sample_ids": True,
            # Some gradients are float noise (an attention key bias has a true gradient of
            # zero), and the noise differs between the 1-rank and 2-rank sums and from run to
            # run. Adam scales a gradient by its own size, so at eps 1e-6 noise moved weights:
            # 4e-7 to 1.8e-6 (in in_proj_bias) over 3 runs of the 4 cases, and once, in a full
            # suite, 1.4e-5 in token_embedding, over TOL. At eps 1e-4 the worst of the same 12
            # was 1.2e-7 to 5.3e-7, while real gradients, far above 1e-4, train as before; the
            # per-step gradient norm still catches a gradient scaled by the world size.
            "optim.eps": 1e-4,
            **extra,
        },
    )


def rank_main(tree: dict[str, Any], rank: int, world: int, port: int, step_delay: float) -> None:
    """One rank of a ``world``-rank run, with the environment torchrun gives its workers."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )  # fmt: skip
    run_training(tree, step_delay)


def start(ctx, tree: dict[str, Any], world: int, step_delay: float = 0.0) -> list:
    port = free_port()
    procs = [ctx.Process(target=rank_main, args=(tree, r, world, port, step_delay)) for r in range(world)]
    for p in procs:
        p.start()
    return procs


def join(procs: list, what: str) -> None:
    deadline = time.time() + TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.time()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:  # a rank left waiting in a collective for a dead one
        p.kill()
        p.join()
    assert not alive, f"{what}: a rank was still running after {TIMEOUT_S} s"
    assert [p.exitcode for p in procs] == [0] * len(procs), (
        f"{what}: exit codes {[p.exitcode for p in procs]}"
    )


def train(ctx, tree: dict[str, Any], world: int) -> Path:
    join(start(ctx, tree, world), tree["train"]["run_name"])
    return Path(tree["train"]["output_dir"]) / tree["train"]["run_name"]


def weights(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    state = ckpt.load(ckpt.checkpoint_path(run_dir, step))
    assert state["step"] == step
    return state["model"]


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("grad_norm")]  # training rows only


def global_batches(run_dir: Path, world: int) -> dict[int, list[int]]:
    """step -> the sample idx of the global batch, ranks in rank order."""
    logs = [read_sample_log(sample_log_path(run_dir, r)) for r in range(world)]
    return {s: [i for log in logs for _, idx in log[s] for i in idx] for s in logs[0]}


def assert_same_model(one: Path, many: Path, world: int) -> None:
    # The premise: the same global batches, step by step.
    batches = global_batches(one, 1)
    assert sorted(batches) == list(range(1, STEPS + 1))
    assert global_batches(many, world) == batches
    # Per step: the global-batch loss and the global gradient norm.
    rows_one, rows_many = metric_rows(one), metric_rows(many)
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_many] == [str(s) for s in batches]
    for key in ("grad_norm", "loss", "logit_scale"):
        got = torch.tensor([float(r[key]) for r in rows_many], dtype=torch.float64)
        want = torch.tensor([float(r[key]) for r in rows_one], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k} per step: {m}")
    # The weights, within TOL; they moved by far more than TOL over the last 3 steps.
    want, got, before = weights(one), weights(many), weights(one, STEPS - 3)
    assert want.keys() == got.keys()
    diff = {k: (got[k].double() - want[k].double()).abs().max().item() for k in want}
    worst = max(diff, key=diff.get)
    assert diff[worst] <= TOL, f"largest weight difference {diff[worst]:.2e} in {worst}"
    moved = max((want[k].double() - before[k].double()).abs().max().item() for k in want)
    assert moved > 100 * TOL, moved


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_the_one_rank_model(shards, forkserver, one_rank, tmp_path, case):
    # Two ranks first: with the feature cache, rank 0 computes it while rank 1 waits.
    many = train(forkserver, tree_of(shards, tmp_path, "two", B // 2, **CASES[case]), world=2)
    assert_same_model(one_rank(case), many, world=2)
    if case == "locked_cached":  # the runs trained on cached features of the locked tower
        assert any(Path(shards).parent.glob("_clipkit_cache/*"))


def torchrun_node(recipe: Path, node: int, port: int, log: Path) -> subprocess.Popen:
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "ddp-test",
        "--rdzv-conf", "join_timeout=60",
        "-m", "clipkit.cli.main", "train", str(recipe),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:  # own session: a timed-out launch is killed with its workers
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def test_two_torchrun_nodes_on_localhost_train_the_one_rank_model(shards, one_rank, tmp_path):
    recipe = tmp_path / "two_nodes.yaml"
    recipe.write_text(yaml.safe_dump(tree_of(shards, tmp_path, "nodes", B // 2, **CASES["clip"])))
    port = free_port()
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    nodes = [torchrun_node(recipe, i, port, logs[i]) for i in range(2)]
    deadline = time.time() + TIMEOUT_S
    try:
        codes = [n.wait(timeout=max(1.0, deadline - time.time())) for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
                n.wait()
    assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
    text = "".join(log.read_text() for log in logs)
    assert "2 process(es)" in text and text.count("run folder:") == 1
    assert_same_model(one_rank("clip"), tmp_path / "nodes", world=2)


def test_two_ranks_sigkilled_resume_bit_identical(shards, forkserver, tmp_path):
    """Both ranks SIGKILLed after a checkpoint, mid-pass; the resumed run ends bit for bit as an
    uninterrupted 2-rank run, each rank having trained the same samples at every step."""
    extra = {"data.shuffle_buffer": 6, "train.samples": 12 * B, "train.log_every": 4}  # 3 passes
    ref_dir = train(forkserver, tree_of(shards, tmp_path, "reference", B // 2, **extra), world=2)

    run_dir = tmp_path / "killed"
    procs = start(forkserver, tree_of(shards, tmp_path, "killed", B // 2, **extra), world=2, step_delay=0.05)
    deadline = time.time() + TIMEOUT_S
    # After the checkpoint of step 3, from step 5 on: mid-pass, mid-run.
    while last_step_since_resume(sample_log_path(run_dir)) < 5 or ckpt.latest(run_dir) is None:
        assert all(p.exitcode is None for p in procs), (
            f"run ended ({[p.exitcode for p in procs]}) before the kill"
        )
        assert time.time() < deadline, "step 5 not reached"
        time.sleep(0.002)
    for p in procs:
        p.kill()  # SIGKILL: no handler, no checkpoint
    for p in procs:
        p.join()
    assert ckpt.load(ckpt.latest(run_dir))["step"] < 12
    resumed = tree_of(shards, tmp_path, "killed", B // 2, **extra, **{"train.resume": "latest"})
    join(start(forkserver, resumed, world=2), "resumed run")

    assert sample_log_path(run_dir).read_text().count("# resume") == 1
    want, got = weights(ref_dir, 12), weights(run_dir, 12)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key  # bit for bit
    for rank in range(2):
        assert read_sample_log(sample_log_path(run_dir, rank)) == read_sample_log(
            sample_log_path(ref_dir, rank)
        )
