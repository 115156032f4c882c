"""``IVF<nlist>,<code>``: inverted lists over k-means cells; search width ``nprobe``.

``nlist`` is the power of two nearest ``4 * sqrt(n)``, one candidate per code, most exact
first among those the chooser tries before the smaller ones:

* ``SQ8`` (1 byte/dim: loses ~1-2 points of recall, scans 4x fewer bytes than Flat);
* ``Flat`` (exact distances, when SQ8 cannot reach a very high target);
* product quantization from the largest code down, ``PQ<m>`` (``OPQ<m>`` rotation first
  when each sub-quantizer covers >= 4 dims; with 2 dims per sub-quantizer it buys little
  and trains slowly).

Proposed at every size, after the fast-scan re-ranks of ``ivf_refine`` (faster, 1.3-2.2x
SQ8's memory): for budgets that they do not fit, or targets they miss. It also backs up a
small collection whose Flat index exceeds the budget. Candidates with the same lists share one
k-means (``new_index``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from clipkit.index.families.base import FAMILIES, Candidate, Family, IndexChoiceError

# k-means wants >= 39 training points per centroid (FAISS warns below); 40 leaves margin.
TRAIN_PER_LIST = 40
# libstdc++ grows a vector to at least twice its size when it must reallocate; lists filled by
# many small appends sit on average at 2 ln 2 = 1.39x their size until written out.
VECTOR_SLACK = 1.39
PQ_TRAIN_POINTS = 65_536  # FAISS's default cap for PQ / OPQ training (256 points x 256 codes)
KEY_RE = re.compile(r"(?:OPQ(\d+),)?IVF(\d+),(Flat|SQ8|PQ(\d+))")


def ivf_nlist(n: int) -> int:
    """Power of two nearest 4*sqrt(n), at most n / TRAIN_PER_LIST, within [16, 65536]."""
    target = 4 * math.sqrt(n)
    nlist = 2 ** round(math.log2(max(target, 1)))
    while nlist > 16 and nlist * TRAIN_PER_LIST > n:
        nlist //= 2
    return max(16, min(nlist, 65536))


def pq_sizes(d: int) -> list[int]:
    """Sub-quantizer counts m (code bytes) that divide d, largest first: d/2, d/4, ..., >= 4."""
    return [d // s for s in (2, 4, 8, 16, 32) if d % s == 0 and d // s >= 4]


def setup_ivf(index: faiss.Index, nlist: int, centroids: dict[int, np.ndarray]) -> faiss.Index | None:
    """Prepare the IVF inside a fresh ``index`` for training; returns it when its centroids can
    be shared (its quantizer sees the raw vectors: no rotation in front), else None.

    ``centroids`` (nlist -> (nlist, d) coarse centroids) carries the k-means result from one
    IVF candidate to the next with the same lists (IVF-SQ8 missing the target -> IVF-Flat):
    IndexIVF skips training a quantizer that already holds nlist centroids.
    """
    ivf = faiss.try_extract_index_ivf(index)
    ivf.cp.spherical = True  # unit-norm data: centroids on the sphere (cosine k-means)
    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFPQ):
        # On by default in index_factory; it only serves Hamming-threshold ("ht") search,
        # which clipkit does not use, and it is most of the PQ training time.
        ivf.do_polysemous_training = False
    if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
        return None  # clusters in the rotated space: trains its own
    if nlist in centroids:
        ivf.quantizer.add(centroids[nlist])
    return ivf


def remember_centroids(ivf: faiss.Index | None, centroids: dict[int, np.ndarray]) -> None:
    if ivf is not None:
        centroids[ivf.nlist] = ivf.quantizer.reconstruct_n(0, ivf.nlist)


def merge_lists(files: list[Path]) -> faiss.Index:
    """Join IVF index files that share one training: lists merged, ids shifted part by part."""
    base = faiss.read_index(str(files[0]))  # writable copy
    for path in files[1:]:
        other = faiss.read_index(str(path))
        base.merge_from(other, base.ntotal)  # ids of other shifted by the count so far
    return base


@FAMILIES.register("ivf")
class IVF(Family):
    structure, order, search_param, shares_training = "ivf", 3, "nprobe", True
    key_forms = ("IVF<nlist>,Flat", "IVF<nlist>,SQ8", "IVF<nlist>,PQ<m>", "OPQ<m>,IVF<nlist>,PQ<m>")

    def estimate(
        self, n: int, d: int, nlist: int, code: str, shard_rows: int, opq: bool | None = None
    ) -> Candidate:
        train = min(n, TRAIN_PER_LIST * nlist)
        if code == "Flat":
            code_bytes, trained, key = d * 4, 0, f"IVF{nlist},Flat"
        elif code == "SQ8":
            code_bytes, trained, key = d, 2 * d * 4, f"IVF{nlist},SQ8"
        else:  # "PQ<m>"
            m = int(code[2:])
            code_bytes = m
            trained = 256 * d * 4  # m sub-quantizers x 256 centroids x d/m floats
            key = f"IVF{nlist},PQ{m}"
            if opq if opq is not None else d // m >= 4:
                key = f"OPQ{m},{key}"
                trained += d * d * 4  # the rotation
        centroids = nlist * d * 4
        lists = n * (code_bytes + 8) + nlist * 48  # code + int64 id per vector; two vectors per list
        size = centroids + trained + lists
        # Training: the float32 sample, k-means assignments and distances, PQ/OPQ copies of a
        # 65k subsample (residuals, rotated copy). Adding: lists at their growth slack + one shard.
        train_peak = train * d * 4 + train * 12 + centroids * 2
        if code.startswith("PQ"):
            train_peak += 2 * min(train, PQ_TRAIN_POINTS) * d * 4
        add_peak = int(lists * VECTOR_SLACK) + centroids + trained + 2 * shard_rows * d * 4
        return Candidate(key, "ivf", "ivf", code_bytes, nlist, train, size, max(train_peak, add_peak))

    def propose(self, n: int, d: int, shard_rows: int) -> list[Candidate]:
        codes = ["SQ8", "Flat"] + [f"PQ{m}" for m in pq_sizes(d)]
        return [self.estimate(n, d, ivf_nlist(n), c, shard_rows) for c in codes]

    def parse(self, key: str, n: int, d: int, shard_rows: int) -> Candidate | None:
        m = KEY_RE.fullmatch(key)
        if not m or (m.group(1) and m.group(1) != m.group(4)):
            return None
        if m.group(4) and d % int(m.group(4)):
            raise IndexChoiceError(f"index key {key!r}: PQ{m.group(4)} needs d={d} divisible by {m.group(4)}")
        return self.estimate(n, d, int(m.group(2)), m.group(3), shard_rows, opq=bool(m.group(1)))

    def new_index(
        self, cand: Candidate, d: int, draw: Callable[[int], np.ndarray], cache: dict
    ) -> faiss.Index:
        index = faiss.index_factory(d, cand.key, faiss.METRIC_INNER_PRODUCT)
        shared = setup_ivf(index, cand.nlist, cache)
        if not index.is_trained:
            index.train(draw(cand.train_rows))
        remember_centroids(shared, cache)
        return index

    def search_range(self, index: faiss.Index, k: int) -> tuple[int, int]:
        return 1, faiss.extract_index_ivf(index).nlist

    def owns(self, index: faiss.Index) -> bool:
        outer = faiss.downcast_index(index)
        plain = isinstance(outer, (faiss.IndexIVF, faiss.IndexPreTransform))  # not wrapped in a re-rank
        return plain and faiss.try_extract_index_ivf(index) is not None

    def prepare_reconstruct(self, index: faiss.Index) -> None:
        faiss.extract_index_ivf(index).make_direct_map()

    def join(self, files: list[Path], key: str, d: int) -> faiss.Index:
        return merge_lists(files)
