"""Which FAISS index to build for ``n`` vectors of width ``d`` under a memory budget. Pure.

``plan(n, d, budget)`` returns the candidate index keys that fit the budget, most promising
first, with an honest memory estimate for each: the bytes the index holds once loaded for
serving (what the budget limits, as autofaiss's ``max_index_memory_usage`` does) and the peak
while building it (training sample, k-means work arrays, ``std::vector`` growth of the
inverted lists, one shard of float32 vectors). The builder tries them in order and keeps the
first that reaches the target recall after tuning or, when ``compare_families`` > 1, the one
with the most queries/s among the first to reach it in each family (``clipkit.index.build``).

The order, and why:

* ``n <= EXACT_ONLY_N``: ``Flat``. Exact, and a scan of 2k vectors costs about a lookup.
* ``n <= HNSW_MAX_N``: ``Flat`` (up to ``FLAT_MAX_N``), ``HNSW32`` and the IVF candidates
  are contenders: in each family the first candidate that reaches the target recall is
  built and tuned, and the one with the most queries/s at batch 1 is kept. Flat costs only
  its speed measurement (no training, exact by construction). Which wins depends on the
  data and the load: on 11k real image embeddings (the bundled images, 2 threads) HNSW32 at
  efSearch 16 and IVF256,SQ8 at nprobe 17 both answer 25-37k queries/s against Flat's
  4k at best, the two trading places from run to run; on 60k noisy 64-d clusters IVF256,Flat
  beat HNSW32 (1,170 against 940 q/s, built in a third of the time). Each builds in seconds
  at 11k and within a minute at 100k; above that HNSW's build (serial graph inserts, ~1 min
  per 100k on 2 cores) dominates, and its memory (vectors + 260 B/vector of graph) rarely
  beats IVF's for a budget.
* IVF with ``nlist`` = the power of two nearest ``4 * sqrt(n)``, one code per fitting budget:
  ``SQ8`` (1 byte/dim: loses ~1-2 points of recall, scans 4x fewer bytes than Flat),
  then ``Flat`` (exact distances, when SQ8 cannot reach a very high target), then product
  quantization from the largest code down (``OPQ`` rotation first when each sub-quantizer
  covers >= 4 dims; with 2 dims per sub-quantizer it buys little and trains slowly).
  IVF also backs up a small collection whose Flat index exceeds the budget.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from clipkit.errors import ClipkitError

EXACT_ONLY_N = 2_000
FLAT_MAX_N = 50_000
HNSW_MAX_N = 100_000
HNSW_M = 32
# k-means wants >= 39 training points per centroid (FAISS warns below); 40 leaves margin.
TRAIN_PER_LIST = 40
# libstdc++ grows a vector to at least twice its size when it must reallocate; lists filled by
# many small appends sit on average at 2 ln 2 = 1.39x their size until written out.
VECTOR_SLACK = 1.39
PQ_TRAIN_POINTS = 65_536  # FAISS's default cap for PQ / OPQ training (256 points x 256 codes)


class IndexChoiceError(ClipkitError, ValueError):
    """No index of the known families fits the memory budget (or a bad budget string)."""


@dataclass(frozen=True)
class Candidate:
    key: str  # FAISS index_factory string
    family: str  # "flat" | "hnsw" | "ivf"
    code_bytes: int  # bytes per vector of the stored code (d*4 Flat, d SQ8, m PQ)
    nlist: int  # IVF lists; 0 otherwise
    train_rows: int  # vectors sampled to train it; 0 when it needs no training
    index_bytes: int  # size once loaded for serving
    build_peak_bytes: int  # peak while training + adding (see module docstring)


@dataclass(frozen=True)
class Plan:
    n: int
    d: int
    budget_bytes: int
    candidates: list[Candidate]
    rejected: list[tuple[Candidate, str]] = field(default_factory=list)
    # Build the best candidate of this many families (flat, hnsw, ivf) and keep the fastest.
    compare_families: int = 1


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_memory(text: str | int) -> int:
    """``"512MB"``, ``"1.5G"``, ``"300MiB"`` or a byte count -> bytes (binary units, as autofaiss)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise IndexChoiceError(f"memory size {text!r} is not like '512MB', '1.5G' or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


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


# --------------------------------------------------------------------------- estimates


def _flat(n: int, d: int) -> Candidate:
    size = n * d * 4
    return Candidate("Flat", "flat", d * 4, 0, 0, size, size)


def _hnsw(n: int, d: int, shard_rows: int, m: int = HNSW_M) -> Candidate:
    # Level 0 keeps 2M neighbour ids per node, upper levels M each with probability ~1/M per
    # level, so (2M + 1) int32 per node; plus int64 offsets and an int32 level per node.
    per_vector = d * 4 + (2 * m + 1) * 4 + 12
    size = n * per_vector
    # The neighbour tables grow by doubling too; one float32 shard is in memory while adding.
    peak = int(size * 1.2) + shard_rows * d * 4
    return Candidate(f"HNSW{m}", "hnsw", d * 4, 0, 0, size, peak)


def _ivf(n: int, d: int, nlist: int, code: str, shard_rows: int, opq: bool | None = None) -> Candidate:
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
    return Candidate(key, "ivf", code_bytes, nlist, train, size, max(train_peak, add_peak))


def estimate(key: str, n: int, d: int, shard_rows: int = 10_000) -> Candidate:
    """The estimate for one explicit index key of the families above."""
    if key == "Flat":
        return _flat(n, d)
    hnsw = re.fullmatch(r"HNSW(\d+)", key)
    if hnsw:
        return _hnsw(n, d, shard_rows, int(hnsw.group(1)))
    m = re.fullmatch(r"(?:OPQ(\d+),)?IVF(\d+),(Flat|SQ8|PQ(\d+))", key)
    if not m or (m.group(1) and m.group(1) != m.group(4)):
        raise IndexChoiceError(
            f"index key {key!r} is not one clipkit builds; use Flat, HNSW<M>, IVF<nlist>,Flat, "
            "IVF<nlist>,SQ8, IVF<nlist>,PQ<m> or OPQ<m>,IVF<nlist>,PQ<m>"
        )
    if m.group(4) and d % int(m.group(4)):
        raise IndexChoiceError(f"index key {key!r}: PQ{m.group(4)} needs d={d} divisible by {m.group(4)}")
    return _ivf(n, d, int(m.group(2)), m.group(3), shard_rows, opq=bool(m.group(1)))


def plan(n: int, d: int, budget_bytes: int, shard_rows: int = 10_000) -> Plan:
    """Candidates that fit ``budget_bytes`` when loaded, in the order the builder tries them."""
    if n < 1 or d < 1:
        raise IndexChoiceError(f"cannot index {n} vectors of dimension {d}")
    wanted = [_flat(n, d)] if n <= FLAT_MAX_N else []
    if EXACT_ONLY_N < n <= HNSW_MAX_N:
        wanted.append(_hnsw(n, d, shard_rows))
    nlist = ivf_nlist(n)
    codes = ["SQ8", "Flat"] + [f"PQ{m}" for m in pq_sizes(d)]
    wanted += [_ivf(n, d, nlist, c, shard_rows) for c in codes]
    fits = [c for c in wanted if c.index_bytes <= budget_bytes]
    rejected = [
        (c, f"needs {format_bytes(c.index_bytes)} > budget {format_bytes(budget_bytes)}")
        for c in wanted
        if c.index_bytes > budget_bytes
    ]
    if not fits:
        smallest = min(wanted, key=lambda c: c.index_bytes)
        raise IndexChoiceError(
            f"no index of {n} x {d} vectors fits in {format_bytes(budget_bytes)}: the smallest, "
            f"{smallest.key}, needs {format_bytes(smallest.index_bytes)}; raise --memory"
        )
    compare = 1 if n <= EXACT_ONLY_N else len({c.family for c in fits})
    return Plan(n, d, budget_bytes, fits, rejected, compare_families=compare)
