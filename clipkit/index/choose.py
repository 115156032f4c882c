"""Which FAISS index to build for ``n`` vectors of width ``d`` under a memory budget. Pure.

``plan(n, d, budget)`` asks every registered index family (``clipkit.index.families``) for
its candidates, keeps those that fit the budget, in family order, with an honest memory
estimate for each: the bytes the index holds once loaded for serving (what the budget
limits, as autofaiss's ``max_index_memory_usage`` does) and the peak while building it
(training sample, k-means work arrays, ``std::vector`` growth of the inverted lists, one
shard of float32 vectors). The builder tries them in order and keeps the first that reaches
the target recall after tuning or, when ``compare_families`` > 1, the one with the most
queries/s among the first to reach it in each structure (``clipkit.index.build``).

The order, and why (each family's module gives its own reasons):

* ``n <= EXACT_ONLY_N``: ``Flat``. Exact, and a scan of 2k vectors costs about a lookup.
  Families that pay off only at scale (``scale_only``: the HNSW graph) are not proposed;
  inverted lists back up a small collection whose Flat index exceeds the budget.
* Above it, ``Flat`` (up to ``flat.FLAT_MAX_N``), ``HNSW32`` (up to ``hnsw.HNSW_MAX_N``) and
  the IVF candidates are contenders: in each structure the first candidate that reaches
  the target recall is built and tuned, and the one with the most queries/s at batch 1 is
  kept. Flat costs only its speed measurement (no training, exact by construction).
* The inverted lists, fastest first: the fast-scan lists of ``ivf_refine`` (``nlist`` the
  power of two nearest ``2 * sqrt(n)``) with a float16 re-rank (2.25d + 8 bytes a vector),
  then with an 8-bit one (1.25d + 8), then IVF with ``nlist`` nearest ``4 * sqrt(n)``:
  ``SQ8``, ``Flat``, product codes from the largest down. A budget too small for either
  re-rank gets SQ8 (d + 8 bytes) or product codes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from clipkit.index.families import Candidate, IndexChoiceError, in_order
from clipkit.index.families.ivf import ivf_nlist  # noqa: F401  (the nlist rule, part of the choice)

EXACT_ONLY_N = 2_000


@dataclass(frozen=True)
class Plan:
    n: int
    d: int
    budget_bytes: int
    candidates: list[Candidate]
    rejected: list[tuple[Candidate, str]] = field(default_factory=list)
    # Build the best candidate of this many structures (flat, hnsw, ivf) and keep the fastest.
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


def estimate(key: str, n: int, d: int, shard_rows: int = 10_000) -> Candidate:
    """The estimate for one explicit index key of a registered family."""
    families = in_order()
    for fam in families:
        cand = fam.parse(key, n, d, shard_rows)
        if cand is not None:
            return cand
    forms = [form for fam in families for form in fam.key_forms]
    raise IndexChoiceError(
        f"index key {key!r} is not one clipkit builds; use {', '.join(forms[:-1])} or {forms[-1]}"
    )


def plan(n: int, d: int, budget_bytes: int, shard_rows: int = 10_000) -> Plan:
    """Candidates that fit ``budget_bytes`` when loaded, in the order the builder tries them."""
    if n < 1 or d < 1:
        raise IndexChoiceError(f"cannot index {n} vectors of dimension {d}")
    small = n <= EXACT_ONLY_N
    wanted = [
        c for fam in in_order() if not (small and fam.scale_only) for c in fam.propose(n, d, shard_rows)
    ]
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
    compare = 1 if small else len({c.structure for c in fits})
    return Plan(n, d, budget_bytes, fits, rejected, compare_families=compare)
