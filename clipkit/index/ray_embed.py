"""``clipkit index embed --engine ray``: the local export, made by Ray actors that each hold the model.

Each actor loads the model once, through ``clipkit.models.specs.load_model`` (every ``--model``
form), on a GPU when ``gpus_per_actor > 0`` (Ray sets the actor's ``CUDA_VISIBLE_DEVICES``) and
on one CPU otherwise, then embeds whole parts with the local engine's ``PartEmbedder`` and
``embed_part``. So the folder is the local one (``clipkit.index.store``: ``.npy`` + parquet +
marker per part, ``embed_config.json``, ``embed_info.json`` from ``store.finish``) and ``index
build``, ``merge`` and ``serve`` read it unchanged.

Ray's ``ActorPool`` hands the parts that are not done to idle actors; there are as many actors
as the cluster has room for (CPUs, or GPUs / ``gpus_per_actor``), at most one per part. An actor
whose process dies is restarted by Ray (it loads the model again) and its part is retried
(``ACTOR_RESTARTS``); a part is written atomically with its marker last, so it is never half
there and never there twice. A second run (after a killed driver) skips the done parts, as the
local engine does. Inputs and ``--out`` must be at the same paths on every node.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from clipkit.data.engines.cluster import cluster_resource, ray_cluster
from clipkit.index.embed import (
    EmbedError,
    PartEmbedder,
    check_options,
    embed_part,
    embed_texts,
    part_line,
    start_export,
)
from clipkit.index.sources import PartSpec, Source
from clipkit.index.store import part_done, part_name
from clipkit.models.specs import load_model

ACTOR_RESTARTS = 4  # restarts of an actor whose process died, and retries of its part


class PartWorker:
    """One model copy; a Ray actor (``ray.remote`` is applied at run time: Ray is optional)."""

    def __init__(
        self, model: str, overrides: list[str], source: Source, out: str, options: dict[str, Any], gpu: bool
    ):
        self.model = load_model(model, overrides, "cuda" if gpu else "cpu")
        self.dim = int(embed_texts(self.model, ["probe"]).shape[1])
        self.out, self.dtype = Path(out), options["dtype"]
        self.embedder = PartEmbedder(
            self.model, source, options["modality"], options["batch_size"], options["on_error"], self.dim
        )

    def describe(self) -> tuple[str, int]:
        """(the model's resolved name, embedding width): what ``embed_config.json`` records."""
        return self.model.resolved, self.dim

    def embed(self, i: int, name: str, spec: PartSpec) -> tuple[int, dict[str, Any]]:
        return i, embed_part(self.embedder, self.out, name, spec, self.dtype)


def _actor_count(ray: Any, gpus_per_actor: float, parts: int) -> int:
    """Actors that fit in the cluster at once (more would wait for ever: actors keep their share)."""
    if gpus_per_actor > 0:
        gpus = cluster_resource(ray, "GPU")
        if gpus < gpus_per_actor:
            raise EmbedError(
                f"--gpus-per-actor {gpus_per_actor:g}: the Ray cluster has {gpus:g} GPUs; "
                "omit --gpus-per-actor to embed on CPUs, or connect to a cluster with GPUs (--address)"
            )
        room = int(gpus // gpus_per_actor)
    else:
        room = int(cluster_resource(ray, "CPU"))
    return max(1, min(room, parts))


def embed_collection_ray(
    model: str,
    source: Source,
    out_dir: str | Path,
    *,
    model_overrides: list[str] | None = None,
    modality: str = "image",
    batch_size: int = 64,
    dtype: str = "float16",
    on_error: str = "skip",
    gpus_per_actor: float = 0.0,
    address: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], list[str]]:
    """``embed_collection`` for every part on a Ray cluster (``ray_cluster(address)``), the model
    given as a ``load_model`` spec; returns (config, part names) for ``store.finish``."""
    check_options(modality, batch_size, dtype, on_error)
    if gpus_per_actor < 0:
        raise EmbedError(f"--gpus-per-actor must be >= 0, got {gpus_per_actor:g}")
    out = Path(out_dir)
    specs = source.parts()
    names = [part_name(i) for i in range(len(specs))]
    todo = [i for i in range(len(specs)) if part_done(out, names[i]) is None]
    options = {"modality": modality, "batch_size": batch_size, "on_error": on_error, "dtype": dtype}
    with ray_cluster(address) as ray:
        from ray.util import ActorPool

        actor = ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)(PartWorker)
        actor = actor.options(num_cpus=1, num_gpus=gpus_per_actor)
        n = _actor_count(ray, gpus_per_actor, len(todo))
        args = (model, list(model_overrides or []), source, str(out), options, gpus_per_actor > 0)
        workers = [actor.remote(*args) for _ in range(n)]
        try:
            model_name, dim = ray.get(workers[0].describe.remote())
            config = start_export(out, source, len(specs), model_name, model_overrides, modality, dtype, dim)
            for i in range(len(specs)):
                if i not in todo:
                    log(f"part {i + 1}/{len(specs)} already done, skipped")
            pool = ActorPool(workers)
            for i, marker in pool.map_unordered(lambda w, i: w.embed.remote(i, names[i], specs[i]), todo):
                log(part_line(i, specs, marker))
        finally:
            for w in workers:
                ray.kill(w)
    return config, names
