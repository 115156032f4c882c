"""FAISS index families, one registered module each (the contract: ``base.Family``).

    flat.py        Flat: exact scan
    hnsw.py        HNSW<M>: graph, efSearch
    ivf.py         IVF<nlist>,{SQ8,Flat,PQ<m>} (+ OPQ): inverted lists, nprobe
    ivf_refine.py  IVF<nlist>,PQ<m>x4fsr,Refine(SQfp16|SQ8): fast-scan lists + float16 / 8-bit re-rank

Adding a family is one module here (a ``Family`` subclass under ``@FAMILIES.register``) and
its line below; the chooser, builder, loader and merger find it through ``FAMILIES``, and
``tests/test_index_families.py`` builds and checks every registered family.
"""

from __future__ import annotations

from clipkit.index.families import flat, hnsw, ivf, ivf_refine  # noqa: F401  (importing registers)
from clipkit.index.families.base import (
    FAMILIES,
    Candidate,
    Family,
    IndexChoiceError,
    MergeError,
    family,
    family_of,
    in_order,
    set_search_params,
    tune_param,
)

__all__ = [
    "FAMILIES",
    "Candidate",
    "Family",
    "IndexChoiceError",
    "MergeError",
    "family",
    "family_of",
    "in_order",
    "set_search_params",
    "tune_param",
]
