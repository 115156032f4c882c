"""Inverted lists on disk: join IVF index files into one ``.ivfdata`` file, and open it again.

An IVF index whose lists exceed the memory budget keeps them in FAISS's
``OnDiskInvertedLists``: one file of ``nlist`` packed lists (codes, then int64 ids, each),
memory-mapped, so only the pages that queries touch are read. The index file itself then holds
the quantizer, the codebooks and, per list, its size and offset into the data file.

Layout in an index folder (``report.json`` names the data file under ``"ivfdata"``):

    index.faiss             the index; its lists are a reference to the data file by name
    index.<token>.ivfdata   the lists; <token> is new for every build or merge

Writes are atomic as a pair: the data file gets a fresh name that nothing refers to, is
written, fsynced, and only then is ``index.faiss`` replaced (atomically) by a file that
refers to it. A build killed at any moment leaves the old index and its old data file
working, plus at most an unreferenced data file, which the next build in the folder removes
(``remove_stale``).

Relocatable: FAISS stores the data file's absolute path; ``open_index`` ignores the directory
and maps the file of that name next to ``index.faiss``, so a folder can be moved or copied
whole. (FAISS's own ``IO_FLAG_ONDISK_SAME_DIR`` does the same but prints to stdout, which
would corrupt ``clipkit index query --json``.)

Ids: FAISS's ``merge_from_multiple(shift_ids=True)`` shifts part i by the size of parts
1..i instead of 0..i-1 (faiss 1.15), so lists are joined unshifted and ``_shift_ids`` adds
each part's offset in place.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import faiss
import numpy as np

from clipkit.data.atomic import fsync_dir
from clipkit.errors import ClipkitError

SUFFIX = ".ivfdata"


class OnDiskError(ClipkitError, ValueError):
    """An index that cannot keep its lists on disk, or a data file that is missing."""


def new_data_path(folder: str | Path, stem: str = "index") -> Path:
    """A fresh, unreferenced data file name in ``folder``: ``<stem>.<token>.ivfdata``."""
    return Path(folder).resolve() / f"{stem}.{uuid.uuid4().hex[:12]}{SUFFIX}"


def lists_of(index: faiss.Index) -> faiss.InvertedLists:
    return faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)


def data_file(index: faiss.Index) -> str:
    """The data file name an on-disk index refers to ("" when its lists are in memory)."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return ""
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return Path(lists.filename).name if isinstance(lists, faiss.OnDiskInvertedLists) else ""


def plain_ivf(index: faiss.Index) -> bool:
    """Plain IVF lists (Flat, SQ, PQ codes: one code size per vector) can go on disk; fast-scan
    blocks (32 vectors interleaved) and re-rank wrappers (``IndexRefine``) cannot."""
    outer = faiss.downcast_index(index)
    ivf = faiss.try_extract_index_ivf(index)
    return (
        ivf is not None
        and isinstance(outer, (faiss.IndexIVF, faiss.IndexPreTransform))
        and not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFastScan)
    )


def open_index(path: str | Path) -> faiss.Index:
    """Read an IVF index file with its lists memory-mapped, read-only, never loaded.

    In-memory lists (``ilar``) are mapped from the index file itself; on-disk lists from the
    data file of the same name next to ``path`` (see the module notes on relocation).
    """
    path = Path(path)
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    lists = lists_of(index)
    if lists.filename:  # on-disk lists: FAISS skipped mapping them (IO_FLAG_MMAP skips IVF data)
        local = path.parent / Path(lists.filename).name
        if not local.is_file():
            raise OnDiskError(
                f"{path} keeps its inverted lists in {local.name}, which is not beside it; copy the "
                "whole index folder, not only index.faiss"
            )
        lists.filename, lists.read_only = str(local.resolve()), True
        lists.do_mmap()
    return index


def join_on_disk(files: list[str | Path], data_path: str | Path) -> faiss.Index:
    """One index with the lists of ``files`` (IVF index files of one training), in order, ids
    shifted part by part as ``Family.join`` does, its lists written to ``data_path``.

    Each part is memory-mapped, not loaded, so the join needs memory only for the quantizer:
    the copy streams list by list from the parts' pages to the data file's.
    """
    parts = [open_index(f) for f in files]  # kept alive: their maps back the lists read below
    for f, part in zip(files, parts):
        if not plain_ivf(part):
            raise OnDiskError(f"{f}: only plain IVF indexes (Flat, SQ or PQ codes) keep their lists on disk")
    ivf = faiss.extract_index_ivf(parts[0])
    target = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(data_path))
    vec = faiss.InvertedListsPtrVector()
    for part in parts:
        vec.push_back(lists_of(part))
    ntotal = target.merge_from_multiple(vec.data(), vec.size(), False)
    _shift_ids(target, [lists_of(p) for p in parts], [int(p.ntotal) for p in parts])
    _fsync(data_path)
    out = faiss.read_index(str(files[0]), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    out_ivf = faiss.extract_index_ivf(out)
    out_ivf.replace_invlists(target, True)  # frees out's own mapped lists; owns target from here
    target.this.disown()
    out.ntotal = out_ivf.ntotal = ntotal
    return out


def _shift_ids(target: faiss.OnDiskInvertedLists, parts: list, counts: list[int]) -> None:
    """Add part i's first id (the count of the parts before it) to its entries in every list.

    After an unshifted ``merge_from_multiple`` list j holds part 0's entries, then part 1's,
    and so on, so its ids are shifted by ``repeat(offsets, sizes[:, j])``.
    """
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)  # (P,)
    if not offsets.any():
        return
    sizes = np.array(
        [[p.list_size(j) for j in range(target.nlist)] for p in parts], dtype=np.int64
    )  # (P, nlist)
    for j in np.nonzero(sizes.sum(0))[0]:
        total = int(sizes[:, j].sum())
        ids = faiss.rev_swig_ptr(target.get_ids(int(j)), total)  # (total,) int64 view into the map
        ids += np.repeat(offsets, sizes[:, j])


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # flushes the pages written through the shared mapping
    finally:
        os.close(fd)
    fsync_dir(Path(path).parent)


def remove_stale(folder: str | Path, keep: str, stem: str = "index") -> None:
    """Remove ``<stem>.*.ivfdata`` files in ``folder`` other than ``keep`` (a name, or "")."""
    for path in Path(folder).glob(f"{stem}.*{SUFFIX}"):
        if path.name != keep:
            path.unlink(missing_ok=True)
