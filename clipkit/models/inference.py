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
activations in the CPU's caches (benchmarks/cache_fill.py measures the gain). A lane always runs
on one thread, so a batch's outputs are the same bits in every fill; against a pass on several
threads they differ in the last bits where a kernel splits its work by thread count (the
attention's fast path does on an AVX-512 CPU: ~1e-7), within 1e-6 (tests/test_cache_fill.py).

``graph_mode`` freezes a convolutional tower's fp32 CPU pass into a TorchScript graph
(``torch.jit.trace`` + ``torch.jit.freeze``): batch norms fold into the convolution weights and
oneDNN fuses each convolution with its activation, so the pass runs with fewer memory sweeps
(EfficientNet-Lite0 at 160 px: ~1.4-2x the images/s of the eager channels-last pass). The folded
weights round differently, so its outputs differ from the eager pass by ~1e-5 relative (the
cache stores float16, ~5e-4 relative); they are deterministic and do not depend on the batch
they are in. Any tower it cannot trace, or whose traced output disagrees with the eager one,
runs eagerly with a warning; ``CLIPKIT_GRAPH_MODE=0`` turns it off.
"""

from __future__ import annotations

import logging
import os
import warnings
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
log = logging.getLogger(__name__)
GRAPH_CHECK_TOL = 1e-3  # graph vs eager on the traced batch (relative and absolute): else eager


def has_conv2d(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def convolutional(module: nn.Module) -> bool:
    """More than one Conv2d: a CNN. A ViT's only convolution is its patch embedding, where
    channels-last buys nothing and would change its numbers for nothing."""
    return sum(isinstance(m, nn.Conv2d) for m in module.modules()) > 1


class _TowerFn(nn.Module):
    """``fn`` as a module that owns ``tower``, so tracing sees the tower's weights as its own."""

    def __init__(self, tower: nn.Module, fn: Callable[[Tensor], Tensor]):
        super().__init__()
        self.tower = tower
        self.fn = fn

    def forward(self, images: Tensor) -> Tensor:
        return self.fn(images)


def graph_mode_enabled() -> bool:
    return os.environ.get("CLIPKIT_GRAPH_MODE", "1").strip().lower() not in ("0", "false", "no", "off")


def graph_mode(
    fn: Callable[[Tensor], Tensor], tower: nn.Module, example: Tensor, precision: str = "fp32"
) -> Callable[[Tensor], Tensor]:
    """``fn`` (images -> tensor, a pure function of ``tower`` in eval mode) as a frozen TorchScript
    graph traced on ``example``, where that is safe and pays: a ``convolutional`` tower on a CPU
    in fp32 (module docstring). Elsewhere, or when tracing fails or its output on ``example``
    differs from ``fn``'s beyond ``GRAPH_CHECK_TOL``, ``fn`` itself. The image size is fixed by
    ``example`` (timm's "same" padding is traced for it); other batch sizes are fine."""
    if (
        precision != "fp32"
        or example.device.type != "cpu"
        or example.dim() != 4
        or tower.training
        or not convolutional(tower)  # a CNN, not a ViT's patch embedding
        or not graph_mode_enabled()
    ):
        return fn
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # TracerWarnings: the padding is fixed for this size
            frozen = torch.jit.freeze(torch.jit.trace(_TowerFn(tower, fn).eval(), example, check_trace=False))
            want, got = fn(example), frozen(example)
    except Exception as exc:  # noqa: BLE001 - any tracing failure: the eager pass is always right
        log.warning("graph mode: cannot trace %s (%s); running it eagerly", type(tower).__name__, exc)
        return fn
    if (
        not isinstance(got, Tensor)
        or got.shape != want.shape
        or not torch.allclose(got.float(), want.float(), rtol=GRAPH_CHECK_TOL, atol=GRAPH_CHECK_TOL)
    ):
        log.warning(
            "graph mode: the traced %s disagrees with its eager pass; running it eagerly",
            type(tower).__name__,
        )
        return fn
    return frozen


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
            # OpenMP's count is per calling thread, but torch sets up a new thread's count lazily,
            # at its first get_num_threads (or first parallel op), from the count the process set
            # last, and set_num_threads does not count as that set-up. Without the first call a
            # lane took whatever the main thread (the loader's decoding, with workers=0) had set
            # by then: two threads a lane now and then, on other kernels (tests/test_cache_fill.py).
            torch.get_num_threads()
            torch.set_num_threads(threads)
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
