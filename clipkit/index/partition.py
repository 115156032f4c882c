"""Fill a trained index from many processes: add per partition, then join, in memory or on disk.

The coarse quantizer (and PQ codebooks) are trained once, in the builder, on a sample. Then:

1. The embedding parts are grouped into ``partitions``: contiguous runs of whole parts with
   about equal rows (``split_parts``). Whole parts, each added in one call, so every vector is
   assigned and encoded exactly as in a one-process build.
2. Each partition is a task for an engine: ``local`` (a process pool on this machine) or
   ``ray`` (``partition_ray.py``: tasks on a Ray cluster; the embeddings and the output folder
   must be on storage every node reads). A task reads the trained index, adds its parts, and
   writes ``p<i>.faiss`` atomically into a work folder named after the training's hash; a
   task whose file is already there (an earlier, interrupted build) is not redone, and a task
   rerun after a crashed worker writes the same bytes.
3. The partition files are joined in order, ids shifted part by part, by the family's
   ``join`` (what ``clipkit index merge`` uses), or, when the lists go on disk, streamed into
   one ``.ivfdata`` file (``ondisk.join_on_disk``). List j then holds
   partition 0's entries of j, then partition 1's, ..., exactly what one process appends.

So searching the result gives the ids and distances of a one-process build on the same
training. Lists go on disk when the index's estimated size exceeds the memory budget; then
the partitions are also made small enough that each worker's share fits the budget.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipkit.data.atomic import atomic_open
from clipkit.errors import ClipkitError
from clipkit.index import ondisk
from clipkit.index.families import Candidate, family
from clipkit.index.families.ivf import VECTOR_SLACK
from clipkit.index.store import EmbeddingSet

ENGINES = ("local", "ray")
WORK_PREFIX = ".partitions-"


class PartitionError(ClipkitError, ValueError):
    """Bad partition settings, an unknown engine, or a task that failed."""


@dataclass(frozen=True)
class FillPlan:
    """How to add the vectors: one process, or partitions on an engine; lists in memory or on disk."""

    partitions: int = 1  # 1: add in this process, part by part
    workers: int = 0  # tasks at once (0: one per core); on Ray, sets the FAISS threads per task
    engine: str = "local"  # "local" (process pool) or "ray"
    address: str | None = None  # Ray cluster address (None: start a local one)
    on_disk: bool = False  # write the lists to an .ivfdata file (set by the builder from the budget)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise PartitionError(f"unknown engine {self.engine!r}; use one of {', '.join(ENGINES)}")
        if self.partitions < 1 or self.workers < 0:
            raise PartitionError(
                f"need partitions >= 1 and workers >= 0 (got {self.partitions}, {self.workers})"
            )


ONE_PROCESS = FillPlan()  # the builder's default: add part by part in this process


@dataclass(frozen=True)
class Task:
    """One partition: add parts ``parts`` of the export at ``emb_root`` to the trained index."""

    emb_root: str
    parts: tuple[int, ...]
    trained: str  # path of the trained, empty index file
    out: str  # partition index file to write
    threads: int  # FAISS threads in the worker


def split_parts(part_rows: list[int], partitions: int) -> list[list[int]]:
    """Contiguous groups of the non-empty parts, about equal in rows; at most one group per part."""
    nonempty = [i for i, rows in enumerate(part_rows) if rows]
    groups = max(1, min(partitions, len(nonempty)))
    cum = np.cumsum([part_rows[i] for i in nonempty])  # rows up to and including each part
    # Part i joins group floor(g * rows_before_i_mid / total): cuts fall near equal-row bounds.
    mid = (cum - np.array([part_rows[i] for i in nonempty]) / 2) / max(1, cum[-1] if len(cum) else 1)
    which = np.minimum((mid * groups).astype(int), groups - 1)
    out: list[list[int]] = [[] for _ in range(groups)]
    for i, g in zip(nonempty, which):
        out[g].append(i)
    return [g for g in out if g]


def add_partition(task: Task) -> dict[str, Any]:
    """Run one task (in a worker process): read, add, write atomically. Returns its counts."""
    out = Path(task.out)
    if out.is_file():  # written whole by an earlier run on the same training
        return {"out": task.out, "rows": int(faiss.read_index(str(out), faiss.IO_FLAG_MMAP).ntotal),
                "seconds": 0.0, "reused": True}  # fmt: skip
    t0 = time.perf_counter()
    faiss.omp_set_num_threads(max(1, task.threads))
    emb = EmbeddingSet(task.emb_root)
    index = faiss.read_index(task.trained)
    for i in task.parts:
        index.add(emb.part(i))  # whole part in one call, as the one-process build adds it
    with atomic_open(out) as f:
        writer = faiss.PyCallbackIOWriter(f.write)
        faiss.write_index(index, writer)
        del writer  # flushes
    return {"out": task.out, "rows": int(index.ntotal), "seconds": time.perf_counter() - t0, "reused": False}


def _run_local(tasks: list[Task], workers: int) -> list[dict[str, Any]]:
    if workers == 1:
        return [add_partition(t) for t in tasks]
    from concurrent.futures import ProcessPoolExecutor

    # spawn, not fork: the parent has run OpenMP (k-means), and a forked libgomp can hang.
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(add_partition, tasks))


def run_tasks(tasks: list[Task], plan: FillPlan, workers: int) -> list[dict[str, Any]]:
    """Results of ``add_partition`` for each task, in task order, on the plan's engine."""
    if plan.engine == "ray":
        from clipkit.index.partition_ray import run_on_ray

        return run_on_ray(add_partition, tasks, address=plan.address)  # Ray runs what the cluster fits
    return _run_local(tasks, workers)


def partitions_needed(cand: Candidate, plan: FillPlan, budget: int, workers: int) -> int:
    """Partitions so that ``workers`` of them in memory at once fit ``budget`` (on disk only)."""
    if not plan.on_disk:
        return plan.partitions
    per_worker = max(1, budget // max(1, workers))
    return max(plan.partitions, math.ceil(cand.index_bytes * VECTOR_SLACK / per_worker))


def fill(
    index: faiss.Index,
    cand: Candidate,
    emb: EmbeddingSet,
    out_dir: Path,
    plan: FillPlan,
    budget: int,
    log: Callable[[str], None],
) -> faiss.Index:
    """``index`` (trained, empty) with every vector of ``emb`` added, per ``plan``."""
    fam = family(cand.family)
    if not fam.shares_training or (plan.partitions <= 1 and not plan.on_disk):
        for _, vectors in emb.iter_parts():  # Flat / HNSW, or one process: part by part
            index.add(vectors)
        return index
    workers = plan.workers or (os.cpu_count() or 1)
    groups = split_parts(emb.part_rows, partitions_needed(cand, plan, budget, workers))
    trained = faiss.serialize_index(index).tobytes()
    work = out_dir / f"{WORK_PREFIX}{hashlib.sha256(trained).hexdigest()[:16]}"
    work.mkdir(parents=True, exist_ok=True)
    with atomic_open(work / "trained.faiss") as f:
        f.write(trained)
    threads = max(1, (os.cpu_count() or 1) // min(workers, len(groups)))
    tasks = [
        Task(
            str(emb.root.resolve()),
            tuple(g),
            str(work / "trained.faiss"),
            str(work / f"p{i:05d}.faiss"),
            threads,
        )
        for i, g in enumerate(groups)
    ]
    t0 = time.perf_counter()
    results = run_tasks(tasks, plan, min(workers, len(tasks)))
    rows = sum(r["rows"] for r in results)
    if rows != emb.n:
        raise PartitionError(
            f"partitions hold {rows} vectors, the export {emb.n}; remove {work} and build again"
        )
    reused = sum(r["reused"] for r in results)
    log(f"{cand.key}: added {rows} vectors in {len(tasks)} partitions on {plan.engine} ({min(workers, len(tasks))} "
        f"at once, {reused} reused) in {time.perf_counter() - t0:.1f} s")  # fmt: skip
    files = [Path(t.out) for t in tasks]
    if plan.on_disk:
        joined = ondisk.join_on_disk(files, ondisk.new_data_path(out_dir))
    else:
        joined = fam.join(files, cand.key, emb.d)
    shutil.rmtree(work)
    return joined
