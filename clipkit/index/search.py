"""Load a built index folder and query it: vectors, texts, images or a key in; rows out.

Loading checks that the parts agree (index width and count against ``report.json``,
``metadata.parquet`` rows against the index), memory-maps the index file where FAISS can
(``IO_FLAG_MMAP_IFC``: the codes of Flat, IVF and HNSW storage stay on disk, paged in on
use), and applies the tuned search parameters. An index whose lists are on disk (``report.json``
names its ``ivfdata`` file) maps them read-only from the file beside ``index.faiss``, wherever
the folder now is (``clipkit.index.ondisk``). A query model of another width is refused
with a message naming both models.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipkit.errors import ClipkitError
from clipkit.index import ondisk
from clipkit.index.build import INDEX_FILE, META_FILE, REPORT_FILE
from clipkit.index.families import IndexChoiceError, family, family_of, set_search_params

HIT_FIELDS = ["key", "caption", "source", "shard", "offset", "idx"]


class SearchIndexError(ClipkitError, ValueError):
    """An index folder that is incomplete or whose files disagree, or a mismatched model."""


class UnknownKeyError(ClipkitError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class SearchIndex:
    def __init__(self, folder: str | Path, *, mmap: bool = True):
        self.folder = Path(folder)
        missing = [f for f in (INDEX_FILE, META_FILE, REPORT_FILE) if not (self.folder / f).is_file()]
        if missing:
            raise SearchIndexError(
                f"{folder} is not a complete index folder: {', '.join(missing)} missing "
                "(write one with `clipkit index build`)"
            )
        self.report: dict[str, Any] = json.loads((self.folder / REPORT_FILE).read_text())
        if self.report.get("ivfdata"):  # lists in index.<token>.ivfdata: always mapped
            try:
                self.index = ondisk.open_index(self.folder / INDEX_FILE)
            except (ondisk.OnDiskError, RuntimeError) as e:
                raise SearchIndexError(f"{self.folder}: {e}") from None
        else:
            flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
            self.index = faiss.read_index(str(self.folder / INDEX_FILE), flags)
        self.meta = pq.read_table(self.folder / META_FILE)
        self._check()
        set_search_params(self.index, self.report.get("search_params", {}))
        try:
            self.family = family_of(self.index)
        except IndexChoiceError as e:
            raise SearchIndexError(f"{self.folder}: {e}") from None
        self._reconstruct_lock = threading.Lock()
        self._reconstruct_ready = False

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def _check(self) -> None:
        index, report, rows = self.index, self.report, self.meta.num_rows
        if index.d != report.get("dim") or index.ntotal != report.get("ntotal"):
            raise SearchIndexError(
                f"{self.folder}: {INDEX_FILE} holds {index.ntotal} vectors of dimension {index.d}, but "
                f"{REPORT_FILE} says {report.get('ntotal')} of {report.get('dim')}; the files come "
                "from different builds"
            )
        if rows != index.ntotal:
            raise SearchIndexError(
                f"{self.folder}: {META_FILE} has {rows} rows but {INDEX_FILE} holds {index.ntotal} vectors; "
                "the metadata is out of step with the index (copied from another build?). Restore the "
                "metadata written with this index, or rebuild it"
            )
        ids = self.meta.column("id")
        if rows and (ids[0].as_py() != 0 or ids[rows - 1].as_py() != rows - 1):
            raise SearchIndexError(f"{self.folder}: {META_FILE} ids are not 0..{rows - 1} in order")

    def check_model(self, model_dim: int, model_name: str) -> None:
        """Refuse a query model whose embeddings have another width than the index's."""
        if model_dim != self.dim:
            raise SearchIndexError(
                f"index {self.folder} holds {self.dim}-d embeddings of model '{self.report.get('model')}', "
                f"but the query model '{model_name}' embeds to {model_dim}-d; query it with the model "
                "that built it, or rebuild the index with this model"
            )

    # ------------------------------------------------------------------ rows

    def rows(self, ids: list[int]) -> list[dict[str, Any]]:
        cols = [c for c in HIT_FIELDS if c in self.meta.column_names]
        table = self.meta.select(["id", *cols]).take(ids)
        return table.to_pylist()

    def id_of(self, key: str) -> int:
        pos = pc.index(self.meta.column("key"), key).as_py()  # linear scan: ~ms per million
        if pos < 0:
            raise UnknownKeyError(f"unknown key {key!r}: no such sample in this index")
        return int(pos)

    # ------------------------------------------------------------------ search

    def search(self, vectors: np.ndarray, k: int, exclude: list[int] | None = None) -> list[list[dict]]:
        """(Q, d) float32 -> per query, up to k rows with their ``score`` (inner product)."""
        vectors = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
        if vectors.shape[1] != self.dim:
            raise SearchIndexError(f"query vectors are {vectors.shape[1]}-d, the index is {self.dim}-d")
        extra = 1 if exclude is not None else 0
        scores, ids = self.index.search(vectors, min(k + extra, self.ntotal))
        out = []
        for qi, (srow, irow) in enumerate(zip(scores, ids)):
            keep = [(s, i) for s, i in zip(srow, irow) if i >= 0 and (exclude is None or i != exclude[qi])][
                :k
            ]
            rows = self.rows([int(i) for _, i in keep])
            for row, (s, _) in zip(rows, keep):
                row["score"] = round(float(s), 6)
            out.append(rows)
        return out

    def vector(self, id_: int) -> np.ndarray:
        """The stored (possibly quantized) vector of ``id_``, as (d,) float32."""
        with self._reconstruct_lock:
            if not self._reconstruct_ready:
                family(self.family).prepare_reconstruct(self.index)
                self._reconstruct_ready = True
        return self.index.reconstruct(int(id_))

    def neighbours(self, key: str, k: int) -> list[dict]:
        """The k nearest other samples of the sample ``key``."""
        id_ = self.id_of(key)
        return self.search(self.vector(id_)[None], k, exclude=[id_])[0]

    def info(self) -> dict[str, Any]:
        r = self.report
        keep = ("index_key", "dim", "ntotal", "model", "modality", "search_params", "k")
        return {k: r.get(k) for k in keep} | {"recall": r.get(f"recall_at_{r.get('k')}")}
