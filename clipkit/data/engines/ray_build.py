"""``clipkit data build ... --engine ray``: the local build's shards, made by Ray tasks.

The output is the local engine's (``clipkit.data.build``) byte for byte: the same keys in the
same shards, the same tars, status parquets, ``sizes.json`` and ``_stats.json`` (bar
``elapsed_s``). Shard ``s`` still holds the source items ``[s * shard_size, (s + 1) *
shard_size)``; what a shard cannot know alone is where its ``idx`` numbering starts and which of
its images an earlier shard already holds (``--dedup``). So each shard is two Ray tasks:

    process (one task per shard, any order)   fetch + caption rules + image processing of its
        items in a thread pool -> its outcomes (kept in Ray's object store) and a summary
        of its ok items: (key, sha1 when deduplicating, samples)
    place (the driver, in shard order)         ``BuildState.place``: first idx and dedup hashes,
        exactly the bookkeeping the local engine does while writing
    write (one task per shard, any order)      ``write_shard``, the local engine's writer: the
        tar, then the parquet, each atomically

Ray schedules the tasks; the driver only keeps at most ``window`` shards open (submitted and
not yet written) so the object store holds a bounded amount of images. A worker that dies
(killed, out of memory, its node lost) has its task retried by Ray (``TASK_RETRIES``); a retried
write replaces whatever the dead one left, and a shard counts as finished only once its tar and
parquet are both in place, so nothing is lost or written twice. When the driver dies, ``--incremental``
keeps every finished shard (the local engine's rule: same options, idx still contiguous) and
builds the rest. The output folder and the inputs must be at the same paths on every node.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipkit.data.atomic import folder_lock
from clipkit.data.build import (
    BuildOptions,
    BuildState,
    Outcome,
    finish_build,
    ok_summary,
    prepare_output,
    process_item,
    remove_temporaries,
    shard_report,
    source_chunks,
    write_shard,
)
from clipkit.data.engines.cluster import cluster_resource, ray_cluster
from clipkit.data.sources import SourceItem

TASK_RETRIES = 4  # reruns of a task whose worker process or node died (not of a raised error)


def process_shard(items: list[SourceItem], opts: BuildOptions) -> tuple[list[Outcome], list[tuple]]:
    """Ray task: the outcomes of one shard's items, in source order, and their ``ok_summary``."""
    with ThreadPoolExecutor(
        max(1, min(opts.threads, len(items))), thread_name_prefix="clipkit-build"
    ) as pool:
        outcomes = list(pool.map(lambda item: process_item(item, opts), items))
    return outcomes, ok_summary(outcomes, opts)


def write_placed_shard(
    out: str, opts: BuildOptions, shard: int, outcomes: list[Outcome], first_idx: int, seen: dict[str, str]
) -> dict[str, Any]:
    """Ray task: write one placed shard with the local engine's writer; returns its progress record."""
    rows = write_shard(Path(out), opts, shard, outcomes, first_idx, seen)
    return shard_report(opts.prefix, shard, rows, reused=False)


@dataclass
class _Open:
    """A shard submitted and not yet written: its items, and its process task's two results."""

    items: list[SourceItem]
    reusable: bool = False  # finished by an earlier run; kept if its idx still fit (--incremental)
    outcomes: Any = None  # ObjectRef of list[Outcome]
    summary: list[tuple] | None = None


class _Driver:
    """Submits the tasks of a shard stream and places the shards in order (module docstring)."""

    def __init__(self, ray: Any, out: Path, opts: BuildOptions, state: BuildState, window: int):
        self.ray, self.out, self.opts, self.state, self.window = ray, out, opts, state, window
        self.process = ray.remote(num_returns=2, max_retries=TASK_RETRIES)(process_shard)
        self.write = ray.remote(max_retries=TASK_RETRIES)(write_placed_shard)
        self.open: dict[int, _Open] = {}  # shard -> state, in shard order (the order of submission)
        self.summaries: dict[Any, int] = {}  # ObjectRef of a pending summary -> shard
        self.writes: dict[Any, int] = {}  # ObjectRef of a pending write -> shard

    def run(self, chunks: Iterator[tuple[int, list[SourceItem]]]) -> int:
        """Build every shard of ``chunks``; returns the last shard number (-1 for an empty source)."""
        last, exhausted = -1, False
        try:
            while True:
                while not exhausted and len(self.open) + len(self.writes) < self.window:
                    nxt = next(chunks, None)
                    if nxt is None:
                        exhausted = True
                        break
                    last = nxt[0]
                    self._submit(*nxt)
                self._place()
                if not self.open and not self.writes:
                    if exhausted:
                        return last
                    continue  # a window of kept shards was placed at once: fill it again
                self._wait()
        except BaseException:
            self._cancel()
            raise

    def _submit(self, shard: int, items: list[SourceItem]) -> None:
        entry = self.open[shard] = _Open(items)
        entry.reusable = self.opts.incremental and shard in self.state.finished
        if not entry.reusable:
            self._process(shard, entry)

    def _process(self, shard: int, entry: _Open) -> None:
        entry.outcomes, summary = self.process.remote(entry.items, self.opts)
        self.summaries[summary] = shard

    def _place(self) -> None:
        """Place the open shards at the front whose turn has come, in shard order."""
        while self.open:
            shard, entry = next(iter(self.open.items()))
            if entry.reusable:
                if not self.state.reuse(shard):  # an earlier shard changed its sample count
                    entry.reusable = False
                    self._process(shard, entry)
                    return
            elif entry.summary is None:
                return
            else:
                first_idx, seen = self.state.place(entry.summary)
                ref = self.write.remote(str(self.out), self.opts, shard, entry.outcomes, first_idx, seen)
                self.writes[ref] = shard
            del self.open[shard]

    def _wait(self) -> None:
        (ready,), _ = self.ray.wait([*self.summaries, *self.writes], num_returns=1)
        if ready in self.summaries:
            self.open[self.summaries.pop(ready)].summary = self.ray.get(ready)
        else:
            self.writes.pop(ready)
            report = self.ray.get(ready)  # raises the task's error, if any
            if self.state.progress is not None:
                self.state.progress(report)

    def _cancel(self) -> None:
        """Stop this build's tasks, and wait until they are gone: a write of a failed build must not
        land after the driver returned (its temporary file is removed by the next build)."""
        pending = [*self.summaries, *self.writes]
        for ref in pending:
            self.ray.cancel(ref, force=True)
        if pending:
            self.ray.wait(pending, num_returns=len(pending), timeout=60)


def build_shards_ray(
    items: Iterable[SourceItem],
    out_dir: str | Path,
    opts: BuildOptions,
    *,
    source: str = "",
    progress: Callable[[dict], None] | None = None,
    address: str | None = None,
    window: int = 0,
) -> dict[str, Any]:
    """``clipkit.data.build.build_shards`` on a Ray cluster (``ray_cluster(address)``); returns the
    ``_stats.json`` content. ``window``: shards open at once (default twice the cluster's CPUs)."""
    out, start = Path(out_dir), time.time()
    with folder_lock(out, f"clipkit data build --engine ray --out {out}"):
        prepare_output(out, opts, source)
        state = BuildState(out, opts, progress)
        with ray_cluster(address) as ray:
            window = window or max(2, int(2 * cluster_resource(ray, "CPU")))
            last = _Driver(ray, out, opts, state, window).run(source_chunks(items, opts.shard_size))
        remove_temporaries(out, opts.prefix)  # left by workers that died while writing
        return finish_build(out, opts, last, source, time.time() - start)
