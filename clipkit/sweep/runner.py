"""Run a sweep: every (variant, seed) as its own process, one after another or N at a time.

Each run is a process of its own (``clipkit.sweep.job``), forked from a multiprocessing
forkserver: a clean interpreter that imports torch and clipkit once, so a run starts at once
and inherits nothing of the sweep's state (threads: a child forked after OpenMP ran hangs).
A crash, an out-of-memory kill or a bad config in one run is recorded (``sweep_failed.json``,
the results table's ``status``) and the sweep goes on. The runs die with the sweep (each
watches its process), and a lock on ``<output>/.sweep.lock`` keeps a second sweep out of the
folder. After a kill, the same command skips finished
runs and resumes the interrupted ones from their newest checkpoint (``clipkit.sweep.job``).
``results.csv`` / ``results.parquet``, ``summary.md`` / ``summary.csv`` and ``summary.png``
are rewritten after every finished run (named ``<sweep name>.results.csv`` and so on when
another sweep's reports are in the folder already: ``clipkit.sweep.report.report_files``).

With ``--parallel N``, each run gets ``train.threads = cores // N`` (at least 1; ``--threads``
sets it), used for training and evaluation alike. Runs that share a locked tower share its
feature cache beside the shards: the first run to start fills it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipkit.sweep.job import (
    FAILED_JSON,
    JOB_JSON,
    LOG,
    RESULT_JSON,
    TRAIN_JSON,
    read_json,
    run_job,
    write_json,
)
from clipkit.sweep.spec import Run, Sweep, SweepError, check_runs, default_metrics, plan_runs

LOCK = ".sweep.lock"
# Imported once by the forkserver, before it forks the first run.
PRELOAD = ["clipkit.sweep.job", "clipkit.training.loop", "clipkit.evaluation.runner", "clipkit.models.specs"]


@dataclass(frozen=True)
class Options:
    parallel: int = 1
    threads: int | None = None  # per run; None = the recipe's (one run at a time) or cores // parallel
    device: str = "auto"  # evaluation device (training: accelerate's choice)
    dry_run: bool = False
    run: bool = True  # False: only rewrite the reports from the results already there
    summary_out: Path | None = None


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_run(parallel: int, threads: int | None, cores: int) -> int | None:
    """``threads`` when given, else ``cores // parallel`` (at least 1) for parallel runs, else None."""
    if threads is not None:
        return threads
    return max(1, cores // parallel) if parallel > 1 else None


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- state of each run


def run_dir(sweep: Sweep, run: Run) -> Path:
    return sweep.runs_dir / run.run_id


def state_of(sweep: Sweep, run: Run, suite_sha: str) -> str:
    """``done`` | ``evaluate`` (trained) | ``resume N`` | ``retry`` (failed before) | ``new``.

    A run folder made with another config stops the sweep: its results would be mixed in."""
    d = run_dir(sweep, run)
    for name in (RESULT_JSON, TRAIN_JSON, JOB_JSON):
        rec = read_json(d / name)
        if rec is not None and rec.get("config_hash") != run.config_hash:
            raise SweepError(
                f"run folder {d} holds a run of another config (its {name} differs from variant "
                f"'{run.variant}' seed {run.seed} as planned now); use another output folder "
                "(--output) or delete that run folder"
            )
    result = read_json(d / RESULT_JSON)
    if result is not None and result.get("suite_sha") == suite_sha:
        return "done"
    if read_json(d / TRAIN_JSON) is not None:
        return "evaluate"
    from clipkit.models.checkpoints import list_checkpoints
    from clipkit.sweep.job import step_of

    found = list_checkpoints(d)
    if found:
        return f"resume {step_of(found[-1])}"
    return "retry" if (d / FAILED_JSON).is_file() else "new"


@contextlib.contextmanager
def locked(folder: Path, wait_s: float = 10.0) -> Iterator[None]:
    """Hold ``folder/.sweep.lock``; another sweep (or a run of one) holding it is an error."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK, "a+") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SweepError(
                        f"another clipkit sweep (or a run it started) is using {folder}; wait for it "
                        "to end, or stop it"
                    ) from None
                time.sleep(0.2)
        yield


# ----------------------------------------------------------------------------- running


def process_context() -> Any:
    """The multiprocessing context of the runs: a forkserver preloading ``PRELOAD`` (started now,
    so it imports while the sweep checks its runs), or spawn where there is no forkserver."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # no effect when this process started a forkserver before
    forkserver.ensure_running()
    return ctx


class _Interrupt(Exception):
    def __init__(self, signum: int):
        self.signum = signum


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise _Interrupt(signum)


def _failure(exitcode: int | None, log: Path) -> dict[str, Any]:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        reason = f"killed by {name}" + (" (out of memory?)" if -exitcode == signal.SIGKILL else "")
    else:
        reason = f"exit code {exitcode}"
    try:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
    except OSError:
        tail = []
    return {
        "exitcode": exitcode,
        "reason": reason,
        "log_tail": tail,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


class Launcher:
    """Starts runs as forked children, at most ``parallel`` at a time, and collects them."""

    def __init__(self, sweep: Sweep, suite_sha: str, opts: Options, ctx: Any, log: Callable[[str], None]):
        self.sweep, self.suite_sha, self.opts, self.ctx, self.log = sweep, suite_sha, opts, ctx, log
        self.running: dict[int, tuple[Run, Any, float]] = {}  # sentinel -> (run, process, start)
        self.events = sweep.output / "sweep.log"

    def event(self, text: str) -> None:
        with open(self.events, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")

    def start(self, run: Run, state: str, label: str) -> None:
        d = run_dir(self.sweep, run)
        d.mkdir(parents=True, exist_ok=True)
        job = {
            "recipe": str(self.sweep.recipe), "overrides": list(run.overrides), "config_hash": run.config_hash,
            "suite": str(self.sweep.suite), "suite_sha": self.suite_sha, "device": self.opts.device,
            "eval_cache": str(self.sweep.output / "eval_cache"), "checkpoints": self.sweep.checkpoints,
            "run_dir": str(d), "variant": run.variant, "seed": run.seed, "run_id": run.run_id,
            "sweep_pid": os.getpid(),
        }  # fmt: skip
        write_json(d / JOB_JSON, job)
        proc = self.ctx.Process(target=run_job, args=(job,), name=f"sweep-{run.run_id}")
        proc.start()
        self.running[proc.sentinel] = (run, proc, time.perf_counter())
        self.event(f"start {run.run_id} ({state})")
        self.log(f"{label} {run.variant} seed {run.seed}: {state} -> {d / LOG}")

    def wait_one(self) -> list[tuple[Run, bool]]:
        """Block until at least one run ends; (run, succeeded) of each that ended."""
        from multiprocessing.connection import wait

        ended = []
        for sentinel in wait(list(self.running)):
            run, proc, t0 = self.running.pop(sentinel)
            proc.join()
            d = run_dir(self.sweep, run)
            ok = proc.exitcode == 0 and read_json(d / RESULT_JSON) is not None
            if not ok:
                fail = _failure(proc.exitcode, d / LOG)
                write_json(d / FAILED_JSON, fail)
                self.log(f"  {run.run_id} FAILED ({fail['reason']}); log {d / LOG}:")
                for line in fail["log_tail"][-5:]:
                    self.log(f"    {line}")
            else:
                self.log(f"  {run.run_id} done in {time.perf_counter() - t0:.1f} s")
            self.event(f"end {run.run_id} {'ok' if ok else 'failed'} exit={proc.exitcode}")
            ended.append((run, ok))
        return ended

    def stop_all(self, signum: int) -> None:
        """Pass a SIGINT / SIGTERM on (the runs checkpoint and exit); kill what outlives 120 s."""
        for _, proc, _ in self.running.values():
            if proc.is_alive():
                os.kill(proc.pid, signum)
        deadline = time.monotonic() + 120
        for run, proc, _ in self.running.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
            self.event(f"end {run.run_id} interrupted exit={proc.exitcode}")
        self.running.clear()


def execute(
    sweep: Sweep, todo: list[tuple[Run, str]], opts: Options, suite_sha: str, ctx: Any,
    report: Callable[[], None], log: Callable[[str], None],
) -> int:  # fmt: skip
    """Run ``todo`` ((run, state) pairs); returns the number of failed runs."""
    launcher, failed, started = Launcher(sweep, suite_sha, opts, ctx, log), 0, 0
    pending = list(todo)
    old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while pending or launcher.running:
            while pending and len(launcher.running) < opts.parallel:
                run, state = pending.pop(0)
                started += 1
                launcher.start(run, state, f"[{started}/{len(todo)}]")
            for _, ok in launcher.wait_one():
                failed += not ok
                report()
    except _Interrupt as stop:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        log(
            f"sweep: {signal.Signals(stop.signum).name}: stopping {len(launcher.running)} run(s) at a checkpoint"
        )
        launcher.stop_all(stop.signum)
        report()
        from clipkit.training.safety import Interrupted

        raise Interrupted(
            "sweep interrupted; run the same command again to resume it", 128 + stop.signum
        ) from None
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    return failed


# ----------------------------------------------------------------------------- the whole sweep


def describe(sweep: Sweep, states: list[tuple[Run, str]], threads: int | None, opts: Options) -> str:
    """The plan: what is common, each variant's overrides, each run's state."""
    lines = [
        (
            f"sweep '{sweep.name}': {len(sweep.variants)} variant(s) x {len(sweep.seeds)} seed(s) = "
            f"{len(states)} runs in {sweep.output}"
        ),
        f"  recipe {sweep.recipe}; suite {sweep.suite}; baseline '{sweep.baseline}'",
        "  every run: "
        + " ".join([*sweep.overrides, "<variant>", *sweep.cli_overrides, "train.seed=<seed>"]),
        f"  {opts.parallel} run(s) at a time; train.threads per run: "
        + (str(threads) if threads else "the recipe's"),
    ]
    lines += ["variants:"] + [
        f"  {v.name}: {' '.join(v.overrides) or '(the recipe)'}" for v in sweep.variants
    ]
    width = max(len(r.run_id) for r, _ in states)
    lines += ["runs:"] + [f"  {r.run_id:<{width}}  {s}" for r, s in states]
    return "\n".join(lines)


def run_sweep(sweep: Sweep, opts: Options, log: Callable[[str], None] = print) -> int:
    """Validate every run, then run what is not done and write the reports; returns the number
    of failed runs (0 = all finished)."""
    from clipkit.sweep.report import check_markdown_target, report_files, summary_png, write_reports

    threads = threads_per_run(opts.parallel, opts.threads, usable_cores())
    runs = plan_runs(sweep, threads)  # every config loaded before anything runs
    metrics = default_metrics(sweep)
    suite_sha = file_sha(sweep.suite)
    if opts.dry_run:
        check_runs(sweep, runs)
        log(describe(sweep, [(r, state_of(sweep, r, suite_sha)) for r in runs], threads, opts))
        return 0
    for md in (report_files(sweep)["summary.md"], opts.summary_out):
        if md is not None:
            check_markdown_target(Path(md))  # before hours of training, not after
    if opts.summary_out is not None:
        summary_png(Path(opts.summary_out))

    def report() -> None:
        write_reports(sweep, runs, metrics, opts.summary_out)

    with locked(sweep.output):
        states = [(r, state_of(sweep, r, suite_sha)) for r in runs]
        todo = [(r, s) for r, s in states if s != "done"] if opts.run else []
        failed = 0
        if todo:
            ctx = process_context()  # the forkserver imports torch while the runs are checked
            check_runs(sweep, runs)
            log(describe(sweep, states, threads, opts))
            failed = execute(sweep, todo, opts, suite_sha, ctx, report, log)
        else:
            log(f"sweep '{sweep.name}': {sum(s == 'done' for _, s in states)} of {len(runs)} runs done")
        report()
    files = report_files(sweep)
    log(f"results: {files['results.csv']}; summary: {files['summary.md']}")
    return failed
