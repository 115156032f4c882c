"""``Flat``: every vector in float32, scanned exhaustively. Exact, and no training.

Proposed up to ``FLAT_MAX_N`` vectors. At or below ``choose.EXACT_ONLY_N`` a scan costs
about a lookup, and the chooser builds it alone when it fits; above, it competes on speed
with the graph and the inverted lists (its queries/s fall linearly with ``n``).
"""

from __future__ import annotations

from pathlib import Path

import faiss

from clipkit.index.families.base import FAMILIES, Candidate, Family

FLAT_MAX_N = 50_000


@FAMILIES.register("flat")
class Flat(Family):
    structure, order, key_forms = "flat", 0, ("Flat",)

    def estimate(self, n: int, d: int) -> Candidate:
        size = n * d * 4
        return Candidate("Flat", "flat", "flat", d * 4, 0, 0, size, size)

    def propose(self, n: int, d: int, shard_rows: int) -> list[Candidate]:
        return [self.estimate(n, d)] if n <= FLAT_MAX_N else []

    def parse(self, key: str, n: int, d: int, shard_rows: int) -> Candidate | None:
        return self.estimate(n, d) if key == "Flat" else None

    def owns(self, index: faiss.Index) -> bool:
        return isinstance(faiss.downcast_index(index), faiss.IndexFlat)

    def join(self, files: list[Path], key: str, d: int) -> faiss.Index:
        base = faiss.IndexFlatIP(d)
        for path in files:
            part = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
            base.add(part.reconstruct_n(0, part.ntotal))  # (n_part, d): exact for Flat storage
        return base
