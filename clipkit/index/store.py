"""The on-disk layout of an embedding export, shared by ``embed`` (writer) and ``build`` (reader).

    <dir>/embed_config.json    what is embedded: model, modality, dtype, inputs (written first)
    <dir>/part-00000.npy       (rows, D) L2-normalised embeddings, float16 (default) or float32
    <dir>/part-00000.parquet   one metadata row per embedding row, same order:
                               key, idx, caption, source, shard, offset
    <dir>/part-00000.json      {"rows", "skipped": {kind: count}, "seconds"}; written last, so a
                               part counts as done only once it exists
    <dir>/embed_info.json      embed_config + dim, rows, parts, skipped; written when all parts
                               are done. Its presence means the export is complete.

Row ``i`` of the concatenation of the parts, in part order, is FAISS id ``i``. ``idx`` is the
dataset-wide sample index (the shard's ``idx`` member, the folder or manifest position; -1
when unknown), ``shard`` and ``offset`` locate the sample (its tar and position in it, or the
folder / manifest and position), ``source`` is its URL or file path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipkit.data.atomic import atomic_open, atomic_write_text
from clipkit.errors import ClipkitError

if TYPE_CHECKING:  # pandas costs 0.25 s to import; only writers need it
    import pandas as pd

META_COLUMNS = ["key", "idx", "caption", "source", "shard", "offset"]
META_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("idx", pa.int64()),
        ("caption", pa.string()),
        ("source", pa.string()),
        ("shard", pa.string()),
        ("offset", pa.int64()),
    ]
)
CONFIG_FILE, INFO_FILE = "embed_config.json", "embed_info.json"


class EmbeddingsError(ClipkitError, ValueError):
    """An embeddings folder that is incomplete, inconsistent or from another run."""


def part_name(i: int) -> str:
    return f"part-{i:05d}"


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def write_part(
    root: str | Path,
    name: str,
    vectors: np.ndarray,
    meta: dict[str, list] | pd.DataFrame,
    skipped: dict[str, int] | None = None,
    seconds: float = 0.0,
) -> None:
    """Write one part: parquet, then npy, then the json marker (each atomically)."""
    import pandas as pd

    root = Path(root)
    table = pa.Table.from_pandas(pd.DataFrame(meta)[META_COLUMNS], schema=META_SCHEMA, preserve_index=False)
    if table.num_rows != len(vectors):
        raise ValueError(f"part {name}: {table.num_rows} metadata rows for {len(vectors)} vectors")
    with atomic_open(root / f"{name}.parquet") as f:
        pq.write_table(table, f)
    with atomic_open(root / f"{name}.npy") as f:
        np.save(f, vectors)
    write_json(root / f"{name}.json", {"rows": len(vectors), "skipped": skipped or {}, "seconds": seconds})


def part_done(root: str | Path, name: str) -> dict[str, Any] | None:
    """The part's marker when the part is complete (all three files), else None."""
    root = Path(root)
    marker = root / f"{name}.json"
    if not (marker.is_file() and (root / f"{name}.npy").is_file() and (root / f"{name}.parquet").is_file()):
        return None
    return json.loads(marker.read_text())


def finish(root: str | Path, config: dict[str, Any], parts: list[str]) -> dict[str, Any]:
    """Check every part is done and agrees on the width, then write ``embed_info.json``."""
    root = Path(root)
    rows, skipped, dims = [], {}, set()
    for name in parts:
        marker = part_done(root, name)
        if marker is None:
            raise EmbeddingsError(f"{root}: part {name} is not finished; run the embed command again")
        shape = np.load(root / f"{name}.npy", mmap_mode="r").shape
        if shape[0] != marker["rows"] or len(shape) != 2:
            raise EmbeddingsError(f"{root}/{name}.npy holds {shape}, its marker says {marker['rows']} rows")
        rows.append(shape[0])
        dims.add(shape[1])
        for kind, count in marker["skipped"].items():
            skipped[kind] = skipped.get(kind, 0) + count
    if len(dims) > 1:
        raise EmbeddingsError(f"{root}: parts disagree on the embedding width: {sorted(dims)}")
    info = {
        **config,
        "dim": dims.pop() if dims else config.get("dim"),
        "rows": sum(rows),
        "parts": parts,
        "part_rows": rows,
        "skipped": skipped,
    }
    write_json(root / INFO_FILE, info)
    return info


class EmbeddingSet:
    """A complete embedding export, read part by part (memory-mapped) as float32."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        info_path = self.root / INFO_FILE
        if not info_path.is_file():
            hint = (
                "the export is unfinished; run `clipkit index embed` again with the same arguments to finish it"
                if (self.root / CONFIG_FILE).is_file()
                else "it is not an output folder of `clipkit index embed`"
            )
            raise EmbeddingsError(f"no {INFO_FILE} in {self.root}: {hint}")
        self.info: dict[str, Any] = json.loads(info_path.read_text())
        self.parts: list[str] = self.info["parts"]
        self.part_rows: list[int] = self.info["part_rows"]
        self.starts = np.concatenate([[0], np.cumsum(self.part_rows)]).astype(np.int64)
        self.n, self.d = int(self.starts[-1]), int(self.info["dim"])

    def part(self, i: int) -> np.ndarray:
        """(rows_i, d) float32 of part i."""
        arr = np.load(self.root / f"{self.parts[i]}.npy", mmap_mode="r")
        if arr.shape != (self.part_rows[i], self.d):
            raise EmbeddingsError(
                f"{self.root}/{self.parts[i]}.npy is {arr.shape}, embed_info.json says "
                f"({self.part_rows[i]}, {self.d}); the folder was changed after the export"
            )
        return np.ascontiguousarray(arr, dtype=np.float32)

    def iter_parts(self) -> Iterator[tuple[int, np.ndarray]]:
        """(first id, float32 vectors) for each non-empty part, in id order."""
        for i, rows in enumerate(self.part_rows):
            if rows:
                yield int(self.starts[i]), self.part(i)

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (any order) as float32 (len(ids), d), reading only the parts they touch."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.d), dtype=np.float32)
        which = np.searchsorted(self.starts, ids, side="right") - 1
        for i in np.unique(which):
            sel = np.nonzero(which == i)[0]
            arr = np.load(self.root / f"{self.parts[i]}.npy", mmap_mode="r")
            out[sel] = arr[ids[sel] - self.starts[i]]
        return out

    def metadata(self) -> pa.Table:
        """All metadata rows in id order."""
        tables = [pq.read_table(self.root / f"{name}.parquet", schema=META_SCHEMA) for name in self.parts]
        table = pa.concat_tables(tables) if tables else META_SCHEMA.empty_table()
        if table.num_rows != self.n:
            raise EmbeddingsError(f"{self.root}: {table.num_rows} metadata rows for {self.n} embeddings")
        return table
