"""One (variant, seed) of a sweep, in its own process: train (or resume), evaluate, record.

Files it keeps in the run folder ``<output>/runs/<run_id>/`` beside the training run's own:

    sweep_job.json     the run's recipe, overrides and config hash (written by the sweep first)
    sweep_train.json   training finished: wall time, step it resumed from (or null)
    sweep_result.json  evaluation finished: every metric as <dataset>/<metric>, wall times
    sweep_failed.json  the last attempt's exit code and log tail (removed by a later success)
    sweep.log          this process's stdout and stderr (appended by each attempt)
    eval/              the suite's CLIP_benchmark JSONs

Each file is written atomically, so one that exists is complete: the sweep skips a run whose
``sweep_result.json`` matches its config and suite, evaluates without training a run whose
``sweep_train.json`` matches, and resumes any other one from its newest good checkpoint
(``train.resume=latest``, which starts afresh when there is none).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from clipkit.data.atomic import atomic_write_text

JOB_JSON, TRAIN_JSON, RESULT_JSON, FAILED_JSON, LOG = (
    "sweep_job.json", "sweep_train.json", "sweep_result.json", "sweep_failed.json", "sweep.log",
)  # fmt: skip


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, default=str) + "\n")


def step_of(checkpoint: Path | None) -> int | None:
    from clipkit.models.checkpoints import STEP_RE

    m = STEP_RE.match(checkpoint.name) if checkpoint is not None else None
    return int(m.group(1)) if m else None


def _die_with(pid: int) -> None:
    """SIGKILL this process when process ``pid`` (the sweep) ends, even by SIGKILL: no orphan keeps
    training into a run folder that the next session of the sweep resumes. A thread waits on a
    pidfd (Linux >= 5.3), else polls once a second."""
    try:
        fd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    except ProcessLookupError:  # the sweep is gone already
        os._exit(128 + signal.SIGKILL)

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])
        else:
            with contextlib.suppress(ProcessLookupError):
                while True:
                    time.sleep(1.0)
                    os.kill(pid, 0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-sweep", daemon=True).start()


def _detach(log_path: Path, sweep_pid: int) -> None:
    """In the run's process: die with the sweep, default signal handling, output to the run's log."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the loop installs its own while it trains
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _die_with(sweep_pid)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    # A forkserver child inherits the forkserver start method, and its loader workers would then
    # be forkserver children too: each passes the run's open fds and fails ("too many fds") with
    # data.workers > 0. Fork them as a plain `clipkit train` on Linux does.
    if "fork" in multiprocessing.get_all_start_methods():
        multiprocessing.set_start_method("fork", force=True)


def _train(job: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Train (resuming from the newest good checkpoint) unless an earlier attempt finished it."""
    done = read_json(run_dir / TRAIN_JSON)
    if done is not None and done.get("config_hash") == job["config_hash"]:
        print(f"[sweep] training finished earlier ({run_dir / TRAIN_JSON}); evaluating only", flush=True)
        return done
    from clipkit.config import load_config
    from clipkit.models.checkpoints import latest
    from clipkit.training.loop import train

    cfg = load_config(job["recipe"], job["overrides"])
    resumed = step_of(latest(run_dir))
    t0 = time.perf_counter()
    train(cfg)
    done = {
        "config_hash": job["config_hash"],
        "train_wall_s": time.perf_counter() - t0,
        "resumed_from_step": resumed,
    }
    write_json(run_dir / TRAIN_JSON, done)
    return done


def _evaluate(job: dict[str, Any], run_dir: Path) -> tuple[dict[str, float], float]:
    """(``{"<dataset>/<metric>": value}``, seconds) of the run's final checkpoint on the suite."""
    import torch

    from clipkit.config import load_config
    from clipkit.evaluation.distributed import init_from_env
    from clipkit.evaluation.runner import RunOptions, run_suite
    from clipkit.evaluation.suite import load_suite

    cfg = load_config(job["recipe"], job["overrides"])
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ranks, device = init_from_env(job["device"])
    opts = RunOptions(
        run_dir / "eval", cfg.eval.batch_size, 0, device, Path(job["eval_cache"]), report=False, ranks=ranks
    )
    t0 = time.perf_counter()
    rows = run_suite([str(run_dir)], load_suite(job["suite"]), opts, log=lambda m: print(m, flush=True))
    return {f"{r['dataset']}/{r['metric']}": float(r["value"]) for r in rows}, time.perf_counter() - t0


def _prune(run_dir: Path, keep: str) -> None:
    """``final``: delete every checkpoint but the newest; ``none``: delete them all; ``all``: keep."""
    from clipkit.models.checkpoints import list_checkpoints, sidecar_path

    found = list_checkpoints(run_dir)
    for ckpt in found[:-1] if keep == "final" else found if keep == "none" else []:
        ckpt.unlink(missing_ok=True)
        sidecar_path(ckpt).unlink(missing_ok=True)


def run_job(job: dict[str, Any]) -> None:
    """The run process's entry point. ``job``: recipe, overrides, config_hash, suite, suite_sha,
    device, eval_cache, checkpoints, run_dir, variant, seed, run_id, sweep_pid."""
    run_dir = Path(job["run_dir"])
    _detach(run_dir / LOG, job["sweep_pid"])
    from clipkit.errors import ClipkitError

    print(f"[sweep] {job['run_id']}: clipkit train {job['recipe']} {' '.join(job['overrides'])}", flush=True)
    try:
        trained = _train(job, run_dir)
        metrics, eval_wall = _evaluate(job, run_dir)
    except ClipkitError as err:
        print(f"error: {err}", flush=True)
        sys.exit(err.exit_code)
    result = {
        "variant": job["variant"],
        "seed": job["seed"],
        "run_id": job["run_id"],
        "config_hash": job["config_hash"],
        "suite_sha": job["suite_sha"],
        "train_wall_s": trained["train_wall_s"],
        "eval_wall_s": eval_wall,
        "wall_s": trained["train_wall_s"] + eval_wall,
        "resumed_from_step": trained.get("resumed_from_step"),
        "metrics": metrics,
    }
    write_json(run_dir / RESULT_JSON, result)
    (run_dir / FAILED_JSON).unlink(missing_ok=True)
    _prune(run_dir, job["checkpoints"])
    print(f"[sweep] {job['run_id']}: done", flush=True)
