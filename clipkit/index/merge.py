"""``clipkit index merge``: join index folders built on separate parts of a collection.

Ids follow the order of the folders given: the first folder's ids, then the second's shifted
by the first's count, and so on; ``metadata.parquet`` is concatenated the same way.

Each index family joins its own kind (``Family.join`` in ``clipkit.index.families``):

* IVF (any code, and the re-ranked ``ivf_refine``): the folders must share one trained index
  (same ``trained_sha256``): build the first normally and the others with ``--trained
  FIRST``. Lists are then joined with FAISS's ``merge_from``, and the result equals one
  build over all vectors. Indexes trained separately have different centroids and cannot be
  joined this way; that is refused.
* Flat and HNSW: vectors are read back from each (exact for these) and added to a new index.

Lists on disk (``clipkit.index.ondisk``): when any part keeps its lists on disk, or the parts
together exceed ``memory`` (``--memory``), plain IVF lists are streamed into one new
``index.<token>.ivfdata`` file beside the merged ``index.faiss``; the parts are mapped, not
loaded. Re-ranked (``ivf_refine``), Flat and HNSW parts are always joined in memory.

The search parameter kept is the largest of the parts' tuned values; recall is not
re-measured (no exact vectors here): run ``clipkit index build`` on the joined embeddings
for a tuned report.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipkit.data.atomic import atomic_open
from clipkit.index import ondisk
from clipkit.index.build import (
    INDEX_FILE,
    META_FILE,
    REPORT_FILE,
    TRAINED_FILE,
    remove_leftovers,
    write_index,
)
from clipkit.index.choose import format_bytes, parse_memory
from clipkit.index.families import MergeError, family
from clipkit.index.search import SearchIndex
from clipkit.index.store import write_json


def _check_compatible(parts: list[SearchIndex]) -> None:
    first = parts[0].report
    for p in parts[1:]:
        r = p.report
        for field in ("index_key", "dim", "model", "metric"):
            if r.get(field) != first.get(field):
                raise MergeError(
                    f"cannot merge {parts[0].folder} and {p.folder}: {field} differs "
                    f"({first.get(field)!r} vs {r.get(field)!r})"
                )
        if family(parts[0].family).shares_training and r.get("trained_sha256") != first.get("trained_sha256"):
            raise MergeError(
                f"{p.folder} was trained separately from {parts[0].folder} (other IVF centroids), so their "
                f"lists cannot be joined; rebuild it with `clipkit index build ... --trained {parts[0].folder}`"
            )


def _join(parts: list[SearchIndex], out: Path, memory: str | int | None, log) -> faiss.Index:
    first = parts[0]
    files = [p.folder / INDEX_FILE for p in parts]
    size = sum(p.report.get("size_bytes", 0) + p.report.get("ivfdata_bytes", 0) for p in parts)
    over = memory is not None and size > parse_memory(memory)
    if (over or any(p.report.get("ivfdata") for p in parts)) and ondisk.plain_ivf(first.index):
        log(f"joining {len(parts)} parts ({format_bytes(size)}) with their lists on disk")
        return ondisk.join_on_disk(files, ondisk.new_data_path(out))
    if over:
        log(
            f"{first.report['index_key']}: over --memory, but only plain IVF lists can go on disk; joined in memory"
        )
    return family(first.family).join(files, first.report["index_key"], first.dim)


def merge_indexes(
    folders: list[str | Path],
    out_dir: str | Path,
    memory: str | int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    if len(folders) < 2:
        raise MergeError("give at least two index folders to merge")
    out = Path(out_dir)
    if any(Path(f).resolve() == out.resolve() for f in folders):
        raise MergeError(f"--out {out} is one of the inputs; write the merged index to a new folder")
    t0 = time.perf_counter()
    parts = [SearchIndex(f) for f in folders]
    _check_compatible(parts)
    first = parts[0]
    out.mkdir(parents=True, exist_ok=True)
    index = _join(parts, out, memory, log)
    data_file = ondisk.data_file(index)
    params: dict[str, int] = {}
    for p in parts:
        for name, value in p.report.get("search_params", {}).items():
            params[name] = max(params.get(name, 0), int(value))
    meta = pa.concat_tables([p.meta.drop_columns(["id"]) for p in parts])
    meta = meta.add_column(0, "id", pa.array(np.arange(meta.num_rows, dtype=np.int64)))
    write_index(index, out / INDEX_FILE)  # the commit point: it names its data file
    with atomic_open(out / META_FILE) as f:
        pq.write_table(meta, f)
    if (first.folder / TRAINED_FILE).is_file():
        with atomic_open(out / TRAINED_FILE) as f:
            f.write((first.folder / TRAINED_FILE).read_bytes())
    keep = ("index_key", "family", "metric", "dim", "model", "modality", "k", "trained_sha256")
    report = {k: first.report.get(k) for k in keep} | {
        "ntotal": int(index.ntotal),
        "search_params": params,
        "merged_from": [str(Path(f).resolve()) for f in folders],
        "part_recalls": [p.report.get(f"recall_at_{p.report.get('k')}") for p in parts],
        "note": "recall not re-measured after the merge; search params are the parts' maximum",
        "size_bytes": (out / INDEX_FILE).stat().st_size,
        **({"ivfdata": data_file, "ivfdata_bytes": (out / data_file).stat().st_size} if data_file else {}),
        "merge_time_s": round(time.perf_counter() - t0, 2),
    }
    write_json(out / REPORT_FILE, report)
    remove_leftovers(out, data_file)
    log(f"merged {len(parts)} indexes: {report['ntotal']} vectors -> {out}")
    return report
