"""The Ray engine for partitioned index adds (``clipkit index build ... --engine ray``).

Ray is an optional extra (``pip install 'clipkit[ray]'``), imported only when this engine runs,
through the cluster helper every Ray engine of clipkit shares (``clipkit.data.engines.cluster``:
this process's connection, ``--address``, ``$RAY_ADDRESS``, or a local cluster for the
command). Each partition is one Ray task reserving as many CPUs as the FAISS threads it runs
(capped at the largest node's CPUs, so that it can be placed); Ray spreads the tasks over the
cluster and reruns a task whose worker died. A rerun writes the same partition file,
atomically, so no vector is added twice or lost. Every node must see the embeddings folder and
the index output folder at the same paths, and have clipkit installed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from clipkit.data.engines.cluster import ray_cluster

TASK_RETRIES = 3  # reruns of a task whose worker process or node died


def run_on_ray(fn: Callable[[Any], Any], tasks: list, *, address: str | None) -> list:
    """``[fn(t) for t in tasks]``, each call a Ray task; results in task order."""
    with ray_cluster(address) as ray:
        node_cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
        biggest = int(max(node_cpus, default=1)) or 1
        tasks = [replace(t, threads=max(1, min(t.threads, biggest))) for t in tasks]
        remote = ray.remote(max_retries=TASK_RETRIES)(fn)
        return ray.get([remote.options(num_cpus=t.threads).remote(t) for t in tasks])
