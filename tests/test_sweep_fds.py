"""A sweep run's loader workers start even when the loader's dataset holds many tensors.

Sweep runs are forkserver children (``clipkit.sweep.runner``). A forkserver child's own
multiprocessing children default to forkserver too, and a forkserver start passes every tensor
storage of the pickled DataLoader worker state as a file descriptor: over ~250 of them it
fails with ``ValueError: too many fds``. That is how every augmented-views run of
benchmarks/recipes.yaml failed at its feature-cache fill. ``clipkit.sweep.job._detach`` makes
the run fork its workers, as a plain ``clipkit train`` does on Linux.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
import torch

from clipkit.sweep import job

pytestmark = pytest.mark.skipif(
    "forkserver" not in multiprocessing.get_all_start_methods(), reason="needs the forkserver start method"
)


class ManyTensors(torch.utils.data.Dataset):
    def __init__(self, n: int):
        self.items = [torch.full((4,), float(i)) for i in range(n)]  # n storages

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.items[i]


def _load_in_worker(result: Path, log: Path, parent: int, detach: bool) -> None:
    if detach:
        job._detach(log, parent)
    try:
        loader = torch.utils.data.DataLoader(ManyTensors(400), batch_size=100, num_workers=1)
        total = float(sum(b.sum() for b in loader))
        result.write_text(f"ok {total}")
    except ValueError as err:
        result.write_text(f"error {err}")


def _run_as_sweep_child(tmp: Path, detach: bool) -> str:
    ctx = multiprocessing.get_context("forkserver")
    result = tmp / f"result_{detach}.txt"
    p = ctx.Process(target=_load_in_worker, args=(result, tmp / "run.log", os.getpid(), detach))
    p.start()
    p.join(120)
    assert p.exitcode == 0, f"child exited {p.exitcode}"
    return result.read_text()


def test_without_the_fix_a_forkserver_child_cannot_start_loader_workers(tmp_path):
    # the reproduction: proves the setting below is what the run needs
    assert _run_as_sweep_child(tmp_path, detach=False) == "error too many fds"


def test_a_sweep_run_starts_its_loader_workers(tmp_path):
    expected = float(sum(4 * i for i in range(400)))
    assert _run_as_sweep_child(tmp_path, detach=True) == f"ok {expected}"
