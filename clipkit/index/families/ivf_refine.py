"""``IVF<nlist>,PQ<m>x4fsr,Refine(SQfp16|SQ8)``: inverted lists scanned with 4-bit fast-scan PQ
codes of each vector's residual from its list's centroid, then the best ``k * k_factor_rf``
candidates re-ranked with float16 vectors, or 8-bit scalar codes where those do not fit.

Memory per vector: m/2 bytes of fast-scan code + 2d bytes of float16 (d bytes of SQ8) + an
8-byte id, with m = d/2: 2.25d + 8 bytes, 2.2x IVF-SQ8's d + 8 and about half of IVF-Flat's
4d + 8; with the 8-bit re-rank 1.25d + 8, which fits 1M x 256 in 512 MB (313 MiB).

The fastest inverted lists at a given recall, so the chooser tries them first among the
inverted lists (``order``) wherever they fit the budget: the float16 re-rank, then the 8-bit
one (its rounding caps recall as IVF-SQ8's does; where the float16 one misses, this coarser
one is skipped), then IVF-SQ8 and the others. On 300k clustered 256-d vectors (2 threads, recall@10 0.955-0.958, every index
measured alternately in one process: ``benchmarks/index_vs_autofaiss.py --n 300000
--no-bundled --also-key ...``, in benchmarks/RESULTS.md, 2026-12-04 04:44), queries/s at
batch 1 / batch 1000:

* ``IVF1024,PQ128x4fsr,Refine(SQfp16)`` (this family's pick): 12.4k / 41.1k, built in 8 s;
* ``IVF2048,SQ8`` (the pick before): 7.0k / 16.4k, 11 s. The fast-scan pass reads a
  quarter of SQ8's bytes per vector, with SIMD table lookups, and the float16 re-rank is
  near-exact, so the 4-bit codes only have to put the true neighbours among
  ``k * k_factor_rf`` candidates;
* ``IVF2048,PQ128x4fsr,Refine(SQfp16)``: 8.2k / 29.2k, 15 s. ``nlist`` is the power of two
  nearest ``2 * sqrt(n)``, half IVF's (``fast_scan_nlist``): each list costs one centroid
  comparison per query, and the scan is cheap, so fewer, longer lists answer faster and
  train in half the time;
* ``IVF1024,PQ128x4fs,Refine(SQfp16)`` (codes of the vectors, not of their residuals from
  the list's centroid): 6.1k / 22.8k; it needed a re-rank 3x larger (k_factor 32 against 11).

On 1M of them in 512 MB, where only the 8-bit re-rank fits (``--n 1000000 --no-bundled
--also-key IVF4096,SQ8``, RESULTS.md 2026-12-04 06:17): ``IVF2048,PQ128x4fsr,Refine(SQ8)``
5.5k / 19.7k at recall 0.954, built in 28 s, against ``IVF4096,SQ8``'s 3.0k / 6.9k at 0.959,
built in 46 s.

Keys built before residual codes (``PQ<m>x4fs``) still load, merge and parse.
Search parameters: ``nprobe`` and ``k_factor_rf``, tuned in that order (``tune``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from clipkit.index.families.base import (
    FAMILIES,
    Candidate,
    Family,
    IndexChoiceError,
    set_search_params,
    tune_param,
)
from clipkit.index.families.ivf import (
    PQ_TRAIN_POINTS,
    TRAIN_PER_LIST,
    VECTOR_SLACK,
    ivf_nlist,
    remember_centroids,
    setup_ivf,
)

K_FACTOR = "k_factor_rf"  # FAISS's ParameterSpace name for IndexRefine.k_factor
K_FACTOR_MAX = 64  # re-rank at most 64 k candidates (640 vectors for k = 10)
BLOCK = 32  # fast-scan codes are stored in blocks of 32 vectors per list
# Re-rank codes, most exact first: (bytes a dimension, trained floats a dimension: SQ8's range).
REFINE_CODES = {"SQfp16": (2, 0), "SQ8": (1, 2)}
KEY_RE = re.compile(rf"IVF(\d+),PQ(\d+)x4fs(r?),Refine\(({'|'.join(REFINE_CODES)})\)")


def fast_scan_nlist(n: int) -> int:
    """Half of ``ivf_nlist(n)``: the power of two nearest 2*sqrt(n), at least 16."""
    return max(16, ivf_nlist(n) // 2)


@FAMILIES.register("ivf_refine")
class IVFRefine(Family):
    structure, order, search_param, shares_training = "ivf", 2, "nprobe", True
    key_forms = ("IVF<nlist>,PQ<m>x4fsr,Refine(SQfp16)", "IVF<nlist>,PQ<m>x4fsr,Refine(SQ8)")

    def estimate(
        self,
        n: int,
        d: int,
        nlist: int,
        m: int,
        shard_rows: int,
        residual: bool = True,
        refine_code: str = "SQfp16",
    ) -> Candidate:
        train = min(n, TRAIN_PER_LIST * nlist)
        per_dim, ranges = REFINE_CODES[refine_code]
        code_bytes = (m + 1) // 2 + per_dim * d  # 4-bit codes + the re-rank vector
        centroids = nlist * d * 4
        trained = (16 + ranges) * d * 4  # m sub-quantizers x 16 centroids x d/m floats (+ SQ8's range)
        # Per list, the last block of codes is half empty on average; ids are not padded.
        lists = n * ((m + 1) // 2 + 8) + nlist * (BLOCK // 2 * ((m + 1) // 2) + 48)
        refine = n * per_dim * d
        size = centroids + trained + lists + refine
        train_peak = train * d * 4 + train * 12 + centroids * 2 + 2 * min(train, PQ_TRAIN_POINTS) * d * 4
        add_peak = int((lists + refine) * VECTOR_SLACK) + centroids + trained + 2 * shard_rows * d * 4
        key = f"IVF{nlist},PQ{m}x4fs{'r' if residual else ''},Refine({refine_code})"
        return Candidate(key, "ivf_refine", "ivf", code_bytes, nlist, train, size, max(train_peak, add_peak))

    def propose(self, n: int, d: int, shard_rows: int) -> list[Candidate]:
        if d % 2:
            return []
        return [
            self.estimate(n, d, fast_scan_nlist(n), d // 2, shard_rows, refine_code=c) for c in REFINE_CODES
        ]

    def parse(self, key: str, n: int, d: int, shard_rows: int) -> Candidate | None:
        match = KEY_RE.fullmatch(key)
        if not match:
            return None
        m = int(match.group(2))
        if d % m:
            raise IndexChoiceError(f"index key {key!r}: PQ{m} needs d={d} divisible by {m}")
        return self.estimate(
            n,
            d,
            int(match.group(1)),
            m,
            shard_rows,
            residual=bool(match.group(3)),
            refine_code=match.group(4),
        )

    def new_index(
        self, cand: Candidate, d: int, draw: Callable[[int], np.ndarray], cache: dict
    ) -> faiss.Index:
        index = faiss.index_factory(d, cand.key, faiss.METRIC_INNER_PRODUCT)
        shared = setup_ivf(index, cand.nlist, cache)  # the coarse quantizer sees the raw vectors
        if not index.is_trained:
            index.train(draw(cand.train_rows))
        remember_centroids(shared, cache)
        return index

    def tune(self, index: faiss.Index, ev, target: float):
        """nprobe first, re-ranking the most candidates (so the lists, not the 4-bit codes, limit
        recall); then the smallest ``k_factor_rf`` that still reaches the target at that nprobe.
        The curve's points are ({nprobe, k_factor_rf}, mean recall).
        """
        nlist = faiss.extract_index_ivf(index).nlist
        set_search_params(index, {K_FACTOR: K_FACTOR_MAX})
        probe, (recall, bound), curve = tune_param(index, "nprobe", 1, nlist, ev, target)
        points = [({"nprobe": v, K_FACTOR: K_FACTOR_MAX}, r) for v, r in curve]
        if bound < target:  # more re-ranking cannot help at the best nprobe found
            return probe | {K_FACTOR: K_FACTOR_MAX}, (recall, bound), points
        # Known to reach the target at K_FACTOR_MAX: no plateau stop. On the bundled images (11k
        # real embeddings with groups of identical ones) recall at nprobe 16 went 0.9524, 0.9516,
        # 0.9519 for k_factor 8, 16, 32 and 0.9712 at 64; the plateau rule stopped at 32 and kept
        # k_factor 8, below the target.
        factor, result, curve = tune_param(index, K_FACTOR, 1, K_FACTOR_MAX, ev, target, plateau=False)
        points += [({**probe, K_FACTOR: v}, r) for v, r in curve if v != K_FACTOR_MAX]
        return probe | factor, result, points

    def search_range(self, index: faiss.Index, k: int) -> tuple[int, int]:
        return 1, faiss.extract_index_ivf(index).nlist

    def owns(self, index: faiss.Index) -> bool:
        outer = faiss.downcast_index(index)
        return isinstance(outer, faiss.IndexRefine) and faiss.try_extract_index_ivf(index) is not None

    def join(self, files: list[Path], key: str, d: int) -> faiss.Index:
        """Parts that share one training: the lists and the float16 vectors joined separately."""
        base = faiss.read_index(str(files[0]))  # writable IndexRefine; owns what the views below show
        lists, vectors = faiss.downcast_index(base.base_index), faiss.downcast_index(base.refine_index)
        for path in files[1:]:
            other = faiss.read_index(str(path))  # kept alive while its parts are merged
            lists.merge_from(faiss.downcast_index(other.base_index), lists.ntotal)  # ids shifted
            vectors.merge_from(faiss.downcast_index(other.refine_index), 0)  # flat codes: appended
        base.ntotal = lists.ntotal
        return base
