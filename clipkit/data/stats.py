"""Accumulate the per-batch ``"skipped"`` counts into a run-level report."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any


class SkipStats:
    """Sum of ``batch["skipped"]`` over batches; ``seen`` counts the samples that were used.

    stats = SkipStats()
    for batch in loader:
        stats.update(batch)
    print(stats.report())   # "skipped 3 of 1003 samples (0.30%): decode_error 2, empty_caption 1"
    """

    def __init__(self) -> None:
        self.by_kind: Counter[str] = Counter()
        self.seen = 0

    def update(self, batch: Mapping[str, Any]) -> None:
        self.by_kind.update({k: int(v) for k, v in batch.get("skipped", {}).items()})
        self.seen += len(batch["key"])

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def report(self) -> str:
        if not self.total:
            return f"skipped 0 of {self.seen} samples"
        n = self.seen + self.total
        kinds = ", ".join(f"{k} {v}" for k, v in self.by_kind.most_common())
        return f"skipped {self.total} of {n} samples ({100 * self.total / n:.2f}%): {kinds}"
