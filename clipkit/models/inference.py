"""Bulk inference through a frozen image tower: channels-last layout, optional bf16 autocast.

The feature cache and the evaluation feature pass run a locked tower over thousands of
images and nothing else. Two settings make convolutional towers much faster on CPU there
without touching the tower used in training:

- channels-last memory layout (NHWC) for the tower's 4-D weights and the input batch:
  oneDNN's convolution kernels want it; EfficientNet-Lite0 runs ~1.7x faster on these CPUs.
  Same arithmetic up to float summation order (differences ~1e-6 relative).
- ``precision="bf16"``: autocast to bfloat16 (CPUs with AVX512-BF16, GPUs); another ~2x on
  CPU, at bf16's ~3 significant digits. Opt-in: a cache built so gets its own fingerprint.

The layout is restored when the block ends, so the module's state dict and later training
see the usual contiguous tensors.

``in_lanes`` runs independent batches side by side on a CPU: one thread per lane, each with
one torch thread, instead of every op split across all threads. A small model's ops at
batch 16-32 are too short to split well (each split ends in a barrier, and on a shared
machine a descheduled thread stalls the others), and a small batch keeps a lane's
activations in the CPU's caches (benchmarks/cache_fill.py measures the gain). Which kernel runs
depends on the batch, not the thread count, so each batch's outputs are bit-identical to a
one-lane run of it (tests/test_cache_fill.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor, nn

PRECISIONS = ("fp32", "bf16")
T = TypeVar("T")
R = TypeVar("R")


def has_conv2d(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


@contextmanager
def bulk_inference(tower: nn.Module, precision: str = "fp32") -> Iterator[Callable[[Tensor], Tensor]]:
    """Within the block, ``prep(images)`` lays a batch out for ``tower``; run the tower under it.

    >>> with bulk_inference(model.vision) as prep:
    ...     feats = model.tower_features(prep(images))
    """
    if precision not in PRECISIONS:
        raise ValueError(f"inference precision must be one of {PRECISIONS}, got {precision!r}")
    convs = has_conv2d(tower)
    device = next((p.device for p in tower.parameters()), torch.device("cpu"))
    if convs:
        with torch.inference_mode(False):  # weights stay ordinary tensors, fit for training later
            tower.to(memory_format=torch.channels_last)

    def prep(images: Tensor) -> Tensor:
        return images.contiguous(memory_format=torch.channels_last) if convs and images.dim() == 4 else images

    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield prep
    finally:
        if convs:
            with torch.inference_mode(False):
                tower.to(memory_format=torch.contiguous_format)


def cpu_lanes(device: torch.device | str) -> int:
    """Lanes for bulk inference on ``device``: one per torch thread on a CPU, else 1."""
    return max(1, torch.get_num_threads()) if torch.device(device).type == "cpu" else 1


def in_lanes(
    fn: Callable[[T], R], items: Iterable[T], lanes: int, precision: str = "fp32", device_type: str = "cpu"
) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` for each of ``items``, in their order, with up to ``lanes`` calls at once.

    Each call runs under ``torch.inference_mode`` (and bf16 autocast when asked): both are
    per-thread states, so they are set in the lane itself. With ``lanes`` > 1 every lane uses
    one torch thread (see the module docstring); the caller's thread count is restored after.
    At most ``lanes`` items wait beyond the running ones, so a slow consumer bounds the memory.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"inference precision must be one of {PRECISIONS}, got {precision!r}")
    bf16 = precision == "bf16"

    def call(item: T, threads: int | None) -> R:
        if threads is not None:
            torch.set_num_threads(threads)  # OpenMP's count is per calling thread
        with torch.inference_mode(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
            return fn(item)

    if lanes <= 1:
        for item in items:
            yield item, call(item, None)
        return
    before = torch.get_num_threads()
    pending: deque[tuple[T, Future[R]]] = deque()
    pool = ThreadPoolExecutor(lanes, thread_name_prefix="clipkit-lane")
    try:
        for item in items:
            pending.append((item, pool.submit(call, item, 1)))
            if len(pending) >= 2 * lanes:  # lanes running, as many queued
                first, done = pending.popleft()
                yield first, done.result()
        while pending:
            first, done = pending.popleft()
            yield first, done.result()
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)
        torch.set_num_threads(before)
