"""Guards around a training run: pre-flight checks, the stall watchdog, graceful signals.

preflight_shards(cfg.data, world)   shard count vs readers (unless resampled); every local shard opens
check_run_folder(run_dir, need)     a probe write and the free space, before any step
Watchdog(timeout, describe)         reports when the loop waits for a batch too long
NonFiniteSteps(limit)               skipped non-finite steps; stops the run after `limit` in a row
GracefulStop()                      SIGTERM / SIGINT: checkpoint at the next step, then exit
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Self

from clipkit.config import DataConfig
from clipkit.data.atomic import atomic_write_text
from clipkit.data.tario import start_problem
from clipkit.data.urls import expand_urls, is_local, open_url
from clipkit.errors import ClipkitError


class Interrupted(ClipkitError):
    """The run stopped on a signal after writing its checkpoint; exit with ``exit_code``."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ---------------------------------------------------------------------------- pre-flight


def preflight_shards(cfg: DataConfig, world: int) -> None:
    """Fail before the model is built when the shards cannot feed ``world`` ranks x workers.

    Too few shards for the readers is an error; a count that is not a multiple of the
    readers a warning (some readers run dry early each epoch and their peers' last batches
    wait alone). With ``data.resampled`` every reader draws from all shards: any count will
    do. Every local shard is opened and its first header checked (one block each); an
    unreadable one is an error, or a warning with ``data.on_error=skip``.
    """
    urls = expand_urls(cfg.train)
    readers = max(1, cfg.workers) * world
    if cfg.resampled:
        pass  # no dealing out, no minimum (clipkit.data.resample)
    elif len(urls) < readers:
        raise ClipkitError(
            f"{len(urls)} training shard(s) for {world} rank(s) x {max(1, cfg.workers)} loader worker(s) = "
            f"{readers} readers: every reader needs its own shard(s); write at least {readers} shards, "
            f"lower data.workers, or set data.resampled=true (shards drawn with replacement)"
        )
    elif len(urls) % readers:
        warnings.warn(
            f"{len(urls)} training shards over {readers} readers ({world} rank(s) x {max(1, cfg.workers)} "
            f"worker(s)) is uneven: some readers get one shard more, so each epoch ends with only some of "
            f"them busy; a multiple of {readers} shards balances the work",
            stacklevel=2,
        )
    bad = []
    for url in urls:
        if not is_local(url):
            continue  # a pipe or URL would be read twice; its errors are counted when it is read
        try:
            with contextlib.closing(open_url(url)) as stream:
                why = start_problem(stream)
        except OSError as err:
            why = f"cannot be opened ({err.strerror or err})"
        if why:
            bad.append(f"'{url}' {why}")
    if not bad:
        return
    listed = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    if cfg.on_error == "raise":
        raise ClipkitError(
            f"{len(bad)} of {len(urls)} training shards are unreadable: {listed} (rebuild them, or set "
            "data.on_error=skip to train on the rest, counting the loss)"
        )
    warnings.warn(f"{len(bad)} of {len(urls)} training shards are unreadable and will be skipped: {listed}")


def check_run_folder(run_dir: Path, need_bytes: int) -> None:
    """A probe write (temporary file, fsync, rename, delete) and room for one checkpoint."""
    probe = run_dir / ".write_probe"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(probe, "clipkit write probe\n")
        probe.unlink()
    except OSError as err:
        raise ClipkitError(
            f"run folder {run_dir} is not writable ({err.strerror or err}): checkpoints could not be "
            "saved; fix the permissions or free space, or set train.output_dir elsewhere"
        ) from err
    free = shutil.disk_usage(run_dir).free
    if free < need_bytes:
        raise ClipkitError(
            f"run folder {run_dir} has {free / 2**20:.1f} MiB free but one checkpoint needs about "
            f"{need_bytes / 2**20:.1f} MiB: free space or set train.output_dir elsewhere"
        )


# ---------------------------------------------------------------------------- watchdog


class Watchdog:
    """A daemon thread that reports once per ``timeout`` s while the loop waits for a batch.

    ``waiting_since() -> float | None`` is when the current wait began (``time.monotonic``);
    ``describe() -> str`` names what is awaited (rank, worker, shard). ``fired`` counts reports.
    """

    def __init__(
        self,
        timeout: float,
        waiting_since: Callable[[], float | None],
        describe: Callable[[], str],
        report: Callable[[str], None] | None = None,
    ):
        self.timeout, self.waiting_since, self.describe = timeout, waiting_since, describe
        self.report = report or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.fired = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clipkit-watchdog", daemon=True)

    def __enter__(self) -> Self:
        if self.timeout > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        reported_for: tuple[float, int] | None = None  # (wait start, reports so far in it)
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            since = self.waiting_since()
            if since is None:
                continue
            waited = time.monotonic() - since
            done = reported_for[1] if reported_for and reported_for[0] == since else 0
            if waited >= self.timeout * (done + 1):
                reported_for = (since, done + 1)
                self.fired += 1
                self.report(
                    f"clipkit watchdog: no batch for {waited:.0f} s (train.stall_timeout_s={self.timeout:g}); "
                    f"waiting for {self.describe()}"
                )


# ---------------------------------------------------------------------------- non-finite steps


class NonFiniteSteps:
    """Counts optimizer steps skipped for a non-finite loss or gradient (``total``, ``streak``).

    ``count(step, result, last_good)`` after each step: None for a finite one, else the line
    to log; raises ``ClipkitError`` at ``limit`` skipped steps in a row (0 = never). A step the
    fp16 gradient scaler skipped (``result["overflow"]``, ``clipkit.training.precision``) is
    not a bad step: it is counted in ``overflows`` and neither extends nor ends the streak.
    """

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.streak = limit, total, 0
        self.overflows = 0

    def count(self, step: int, result: dict[str, float], last_good: Callable[[], Path | None]) -> str | None:
        if result.get("overflow"):
            self.overflows += 1
            return None
        if not result["nonfinite"]:
            self.streak = 0
            return None
        self.total += 1
        self.streak += 1
        if self.limit > 0 and self.streak >= self.limit:
            raise ClipkitError(
                f"stopping at step {step}: {self.streak} steps in a row had a non-finite loss or gradient "
                f"(train.max_nonfinite_steps={self.limit}); their updates were skipped, so the last good "
                f"checkpoint is {last_good()}. Lower optim.lr, check the data, or use train.precision=fp32"
            )
        return (
            f"step {step}: non-finite loss {result.get('loss', math.nan):.4g} or gradient norm "
            f"{result['grad_norm']:.4g}; optimizer step skipped ({self.streak} in a row, {self.total} in this run)"
        )


# ---------------------------------------------------------------------------- signals


class GracefulStop:
    """Within ``with``: the first SIGTERM / SIGINT sets ``signum`` (the loop checkpoints at the end
    of the step and raises ``Interrupted``); a second one exits at once with 128 + signal."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        # os.write, not print: the handler may run while the main thread is inside a write to
        # sys.stderr (the progress bar), and a buffered stream refuses a reentrant call.
        name = signal.Signals(signum).name
        if self.signum is not None:
            os.write(2, f"\nclipkit train: second {name}: exiting now, without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.signum = signum
        os.write(
            2,
            f"\nclipkit train: {name} received: saving a checkpoint at the end of this step, then exiting "
            "(send it again to exit at once)\n".encode(),
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[GracefulStop]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
