"""Shared pieces of the multi-process tests: a free TCP port for the rendezvous, and a gloo
process group that every rank leaves together.

A rank that tears its group down while a peer is still finishing can take the peer down with
it: CI once saw rank 1 of a two-rank gloo test abort (SIGABRT, "terminate called without an
active exception") after both ranks had done their work. ``gloo_group`` therefore ends a
clean run with a barrier, drops what still holds the group's pending work (DDP reducers,
async handles) while the group is alive, and only then destroys it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
from collections.abc import Iterator

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int, *, threads: int = 1) -> Iterator[None]:
    """Rank ``rank`` of a ``world``-rank gloo group on 127.0.0.1:``port`` for the ``with`` body.

    On a clean exit every rank waits for the others before any of them tears down. After an
    error it does not wait (the peers may never arrive); the spawning test reports the error.
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    clean = False
    try:
        yield
        clean = True
    finally:
        if clean:
            dist.barrier()
        gc.collect()  # pending works held by dropped DDP reducers go while the group lives
        dist.destroy_process_group()
