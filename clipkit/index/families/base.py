"""The contract of an index family, its registry, and the search-parameter tuner they share.

A family is one registered class (``@FAMILIES.register("hnsw") class HNSW(Family)``) that
supplies everything the chooser, the builder, the loader and the merger need to know about
one kind of FAISS index:

* for ``choose.plan``: the candidates it proposes for ``n`` vectors of width ``d``, each with
  its factory key and memory estimate (``propose``), and the estimate for an explicit
  ``--key`` (``parse``);
* for ``build``: a trained, empty index for a candidate (``new_index``) and the tuner that
  sets its search parameter(s) to reach a target recall (``tune``);
* for ``search``: whether a loaded index is of this family (``owns``), how to read vectors
  back from it (``prepare_reconstruct``);
* for ``merge``: how to join index files built on separate parts (``join``).

Candidates of one ``structure`` (exhaustive scan, graph, inverted lists) compete among
themselves: the builder keeps the first of a structure that reaches the target, and compares
structures by speed. A new family that shares a structure with an older one is tried only
where the older ones miss (see ``clipkit.index.build``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from clipkit.errors import ClipkitError
from clipkit.registry import Registry

FAMILIES = Registry("index family")
# (search params, (mean recall@k, its lower bound) at them, tuning curve)
TuneResult = tuple[dict[str, int], tuple[float, float], list]


class IndexChoiceError(ClipkitError, ValueError):
    """No index of the known families fits the memory budget (or a bad budget string or key)."""


class MergeError(ClipkitError, ValueError):
    """Index folders that cannot be joined (other model, width, key or training)."""


@dataclass(frozen=True)
class Candidate:
    key: str  # FAISS index_factory string
    family: str  # registered family name: "flat" | "hnsw" | "ivf" | ...
    structure: str  # what it competes within: "flat" | "hnsw" | "ivf"
    code_bytes: int  # bytes per vector of the stored code (d*4 Flat, d SQ8, m PQ)
    nlist: int  # IVF lists; 0 otherwise
    train_rows: int  # vectors sampled to train it; 0 when it needs no training
    index_bytes: int  # size once loaded for serving
    build_peak_bytes: int  # peak while training + adding (see choose.py)


def set_search_params(index: faiss.Index, params: dict[str, int]) -> None:
    ps = faiss.ParameterSpace()
    for name, value in params.items():
        ps.set_index_parameter(index, name, int(value))


def tune_param(
    index: faiss.Index, name: str, start: int, top: int, ev: Any, target: float, plateau: bool = True
) -> TuneResult:
    """Smallest value of search parameter ``name`` whose recall bound reaches ``target``.

    ``ev.recall(index)`` gives (mean recall, lower bound). Returns (params, (recall, bound),
    curve). Doubles the value from ``start`` until the target is met, the value reaches
    ``top`` (exhaustive), or (with ``plateau``) recall stops rising (< 0.002 over two
    doublings); then bisects between the last miss and the first hit. Recall is assumed
    non-decreasing in the value. If the target is never met, the value with the best mean
    recall is kept. ``plateau=False`` is for a search known to reach the target at ``top``:
    recall may then stall and jump (a re-rank that takes in a whole group of tied duplicates
    at once), and only ``top`` ends the doubling.
    """
    measured: dict[int, tuple[float, float]] = {}

    def hit(value: int) -> bool:
        set_search_params(index, {name: value})
        measured[value] = ev.recall(index)
        return measured[value][1] >= target

    value, low, means = start, 0, []  # low: the largest value known to miss (0: none yet)
    while True:
        reached = hit(value)
        means.append(measured[value][0])
        if reached or value >= top:
            break
        if plateau and len(means) >= 3 and means[-1] - means[-3] < 0.002:
            break  # plateau: the codes, not the search, limit recall
        low, value = value, min(value * 2, top)
    if reached:
        high = value
        while low and high - low > 1:
            mid = (low + high) // 2
            if hit(mid):
                high = mid
            else:
                low = mid
        value = high
    else:
        value = max(measured, key=lambda v: measured[v][0])
    set_search_params(index, {name: value})
    return {name: value}, measured[value], [(v, round(m, 4)) for v, (m, _) in sorted(measured.items())]


class Family:
    """One kind of FAISS index. Subclasses set the class attributes and override what differs."""

    structure: str = ""  # candidates of one structure compete; the builder keeps the first to reach
    order: int = 100  # place of this family's candidates in the plan (lower first)
    scale_only: bool = False  # never proposed at or below choose.EXACT_ONLY_N vectors
    search_param: str | None = None  # the parameter ``tune`` sets (None: exact search)
    shares_training: bool = False  # writes trained.faiss; parts to merge must share it (--trained)
    key_forms: tuple[str, ...] = ()  # the keys it builds, for error messages: "HNSW<M>"

    @property
    def name(self) -> str:
        return self.registry_name  # type: ignore[attr-defined]  (set by FAMILIES.register)

    # ------------------------------------------------------------------ chooser

    def propose(self, n: int, d: int, shard_rows: int) -> list[Candidate]:
        """The candidates for ``n`` vectors of width ``d``, in the order to try them."""
        return []

    def parse(self, key: str, n: int, d: int, shard_rows: int) -> Candidate | None:
        """The candidate for an explicit key of this family; None when the key is another's."""
        return None

    # ------------------------------------------------------------------ builder

    def new_index(
        self, cand: Candidate, d: int, draw: Callable[[int], np.ndarray], cache: dict
    ) -> faiss.Index:
        """A trained, empty index for ``cand``.

        ``draw(rows)`` returns a random sample of the collection (``rows`` 0: all of it); it is
        called only when the index needs training. ``cache`` lives for one build and carries
        work from one candidate to the next (IVF: k-means centroids by ``nlist``).
        """
        index = faiss.index_factory(d, cand.key, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(draw(cand.train_rows))
        return index

    def search_range(self, index: faiss.Index, k: int) -> tuple[int, int]:
        """(first value tried, exhaustive value) of ``search_param`` for ``index``."""
        raise TypeError(f"index family '{self.name}' sets search_param but does not define search_range")

    def tune(self, index: faiss.Index, ev: Any, target: float) -> TuneResult:
        """Set the search parameter(s) of ``index`` to reach ``target`` on ``ev``'s queries."""
        if self.search_param is None:  # exact search: the ground truth is this very scan
            return {}, (1.0, 1.0), []
        start, top = self.search_range(index, ev.k)
        return tune_param(index, self.search_param, start, top, ev, target)

    # ------------------------------------------------------------------ loader and merger

    def owns(self, index: faiss.Index) -> bool:
        """Whether a loaded index is of this family."""
        return False

    def prepare_reconstruct(self, index: faiss.Index) -> None:
        """Make ``index.reconstruct`` work (IVF needs a direct map); called once, under a lock."""

    def join(self, files: list[Path], key: str, d: int) -> faiss.Index:
        """One index holding the vectors of ``files`` (index files of this key), in order."""
        raise MergeError(
            f"index family '{self.name}' ({key}) cannot be merged; rebuild it on all the vectors"
        )


def family(name: str) -> Family:
    """The family registered as ``name`` (raises with a suggestion for unknown names)."""
    return FAMILIES.build(name)


def in_order() -> list[Family]:
    """Every registered family, in plan order."""
    return sorted((family(name) for name in FAMILIES.names()), key=lambda f: (f.order, f.name))


def family_of(index: faiss.Index) -> str:
    """The name of the family of a loaded index."""
    for fam in in_order():
        if fam.owns(index):
            return fam.name
    raise IndexChoiceError(f"{type(faiss.downcast_index(index)).__name__} is not an index of a known family")
