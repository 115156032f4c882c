"""What every evaluation dataset shares: a sample stream that ranks and loader workers divide.

A source is read as *units* (a tar shard, a chunk of a file list), each a sequence of raw
records. Loader workers take whole units (worker ``w`` reads units ``u`` with
``u % workers == w``); ranks take single records (rank ``r`` decodes record ``j`` of unit
``u`` when ``(u + j) % world == r``), so every rank decodes the same number of images to
within one per unit and none waits long for the others at the gather. Every decoded sample
carries ``"order": (u, j)``, its position in the single-process reading order, so results
gathered from any number of ranks and workers are put back in one order.

A sample is ``{"image": PIL RGB, "key": str, "order": (u, j)}`` plus ``"label": int``
(classification) or ``"captions": list[str]`` (retrieval).
"""

from __future__ import annotations

import copy
import hashlib
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from clipkit.errors import ClipkitError

TASKS = ("zeroshot_classification", "zeroshot_retrieval")


class EvalDataError(ClipkitError, ValueError):
    """An evaluation dataset that is missing, malformed or empty."""


class KeyFilter:
    """Keep a stable ``fraction`` of sample keys (CRC32 of seed and key), or, with
    ``complement``, the rest: splits one labelled split into two disjoint parts whatever
    the reading order. Picklable, so loader workers can apply it before decoding."""

    def __init__(self, fraction: float, seed: int = 0, complement: bool = False):
        if not 0.0 < fraction < 1.0:
            raise EvalDataError(f"holdout fraction must be in (0, 1), got {fraction}")
        self.fraction, self.seed, self.complement = fraction, seed, complement
        self.cut = int(fraction * 2**32)

    def __call__(self, key: str) -> bool:
        return (zlib.crc32(f"{self.seed}:{key}".encode()) < self.cut) != self.complement

    def __repr__(self) -> str:
        side = "rest" if self.complement else "part"
        return f"KeyFilter({side} of holdout {self.fraction}, seed {self.seed})"


class EvalSource(torch.utils.data.IterableDataset):
    """Base class. Subclasses set ``name``, ``task`` (and ``classnames`` / ``templates`` for
    classification) and implement ``units``, ``read_unit`` and ``decode``."""

    name: str = "dataset"
    task: str = "zeroshot_classification"
    rank: int = 0
    world: int = 1
    key_filter: Callable[[str], bool] | None = None

    # ------------------------------------------------------------------ subclass hooks
    def units(self) -> list[Any]:
        raise NotImplementedError

    def read_unit(self, unit: Any) -> Iterator[dict[str, Any]]:
        """Raw records of one unit, each with ``"__key__"``; nothing decoded yet."""
        raise NotImplementedError

    def decode(self, raw: dict[str, Any], unit: Any) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> str:
        """Everything that determines the samples (paths, sizes, mtimes, options): the cache key."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared
    def shard(self, rank: int, world: int) -> EvalSource:
        """A copy that yields only rank ``rank``'s share of the samples (of ``world``)."""
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        out = copy.copy(self)
        out.rank, out.world = rank, world
        return out

    def filtered(self, key_filter: Callable[[str], bool]) -> EvalSource:
        """A copy that keeps only samples whose key passes ``key_filter`` (checked before decoding)."""
        out = copy.copy(self)
        out.key_filter = key_filter
        return out

    def fingerprint(self) -> str:
        text = f"{type(self).__name__}|{self.describe()}|filter={self.key_filter!r}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        for u, unit in enumerate(self.units()):
            if info is not None and u % info.num_workers != info.id:
                continue
            for j, raw in enumerate(self.read_unit(unit)):
                if (u + j) % self.world != self.rank:
                    continue
                if self.key_filter is not None and not self.key_filter(raw["__key__"]):
                    continue
                sample = self.decode(raw, unit)
                sample["order"] = (u, j)
                yield sample
