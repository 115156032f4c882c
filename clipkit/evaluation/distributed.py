"""Distributed evaluation: every rank embeds its share of a dataset, then all ranks gather.

Ranks split samples one by one (``EvalSource.shard``: rank ``r`` decodes every world-th
record of each shard), so the work is even to within one image per shard. The results meet
in a single ``all_gather_object``; every rank then holds the whole dataset's embeddings in
reading order and computes the (cheap) metrics itself, so no rank idles at a barrier while
another finishes alone; only rank 0 writes files. With one process nothing here touches
``torch.distributed``.

Launch with ``torchrun --nproc-per-node N -m clipkit.cli.main eval ...`` or
``accelerate launch``: the rank and world size come from the environment through
``accelerate``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def current_ranks() -> Ranks:
    """The rank and world size of an initialised process group, else ``Ranks()``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def init_from_env(device: str = "auto") -> tuple[Ranks, str]:
    """(ranks, device). Under torchrun / accelerate (``WORLD_SIZE`` > 1) the process group is
    set up by ``accelerate.PartialState`` (gloo on CPU, nccl on GPU); otherwise one process.
    ``device``: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ..."""
    import torch

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState(cpu=cpu)
        return Ranks(state.process_index, state.num_processes), str(state.device)
    return Ranks(), "cpu" if cpu else ("cuda" if device == "auto" else device)


def all_gather(obj: Any, ranks: Ranks) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` for one process)."""
    if ranks.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out
