"""``HNSW<M>``: a navigable small-world graph over float32 vectors; search width ``efSearch``.

Proposed above ``choose.EXACT_ONLY_N`` and up to ``HNSW_MAX_N`` vectors, where it competes
with Flat and the inverted lists on queries/s at batch 1. Which wins depends on the data and
the load: on 11k real image embeddings (the bundled images, 2 threads) HNSW32 at efSearch 16
and IVF256,SQ8 at nprobe 17 both answer 25-37k queries/s against Flat's 4k at best, the two
trading places from run to run; on 60k noisy 64-d clusters IVF256,Flat beat HNSW32 (1,170
against 940 q/s, built in a third of the time). Each builds in seconds at 11k and within a
minute at 100k; above that HNSW's build (serial graph inserts, ~1 min per 100k on 2 cores)
dominates, and its memory (vectors + 260 B/vector of graph) rarely beats IVF's for a budget.
"""

from __future__ import annotations

import re
from pathlib import Path

import faiss

from clipkit.index.families.base import FAMILIES, Candidate, Family

HNSW_MAX_N = 100_000
HNSW_M = 32
EF_SEARCH_MAX = 4096


@FAMILIES.register("hnsw")
class HNSW(Family):
    structure, order, scale_only, search_param, key_forms = "hnsw", 1, True, "efSearch", ("HNSW<M>",)

    def estimate(self, n: int, d: int, shard_rows: int, m: int = HNSW_M) -> Candidate:
        # Level 0 keeps 2M neighbour ids per node, upper levels M each with probability ~1/M per
        # level, so (2M + 1) int32 per node; plus int64 offsets and an int32 level per node.
        per_vector = d * 4 + (2 * m + 1) * 4 + 12
        size = n * per_vector
        # The neighbour tables grow by doubling too; one float32 shard is in memory while adding.
        peak = int(size * 1.2) + shard_rows * d * 4
        return Candidate(f"HNSW{m}", "hnsw", "hnsw", d * 4, 0, 0, size, peak)

    def propose(self, n: int, d: int, shard_rows: int) -> list[Candidate]:
        return [self.estimate(n, d, shard_rows)] if n <= HNSW_MAX_N else []

    def parse(self, key: str, n: int, d: int, shard_rows: int) -> Candidate | None:
        m = re.fullmatch(r"HNSW(\d+)", key)
        return self.estimate(n, d, shard_rows, int(m.group(1))) if m else None

    def search_range(self, index: faiss.Index, k: int) -> tuple[int, int]:
        return max(16, k), EF_SEARCH_MAX

    def owns(self, index: faiss.Index) -> bool:
        return isinstance(faiss.downcast_index(index), faiss.IndexHNSWFlat)

    def join(self, files: list[Path], key: str, d: int) -> faiss.Index:
        m = int(re.fullmatch(r"HNSW(\d+)", key).group(1))
        base = faiss.IndexHNSWFlat(d, m, faiss.METRIC_INNER_PRODUCT)
        for path in files:
            part = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
            base.add(part.reconstruct_n(0, part.ntotal))  # (n_part, d): exact for Flat storage
        return base
