"""The one reader of manifests: a table of one row per image, whatever command reads it.

``clipkit data build``, ``clipkit index embed`` and ``clipkit eval`` read manifests here, so a
file means the same rows everywhere.

Formats, by suffix (case-insensitive):

    .csv              comma-separated, a header row, standard double-quote quoting, UTF-8
                      (a byte-order mark is ignored); a row longer than the header is an
                      error, the absent fields of a shorter row are missing
    .tsv .tab         tab-separated, a header row, no quoting: a ``"`` is text, as in the
                      CC3M / CC12M TSVs (so a field cannot hold a tab or a line break)
    .parquet          any column types
    .jsonl .ndjson    JSON lines: one object per line, blank lines skipped; columns are the
                      keys in order of first appearance, a key absent from a row is missing
    .json             a JSON array of row objects, JSON lines, or pandas' default
                      ``{"column": {"row": value}}`` layout

The NA rule. A cell is *missing* (``None``) when it is empty: an empty field (``a,,b``), an
empty string, JSON ``null``, a parquet null or a float NaN. Every other cell is *text*, kept
verbatim: ``NA``, ``N/A``, ``null``, ``None``, ``nan``, ``#N/A``, ``007`` and ``" "`` stay the
strings they are (a caption may be the word "null"; stripping and judging text is the
caller's job). A CSV / TSV is never type-guessed; a non-text value of a typed format becomes
text: ``5`` -> ``"5"``, ``2.5`` -> ``"2.5"``, ``true`` -> ``"true"``, a list or object -> its
JSON text.

Errors are ``ManifestError``: a missing file, an unknown suffix, an unreadable file and a
missing column each name the file and say what to do. Rows are numbered from 0, the header
not counted (the DataFrame's index).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipkit.errors import ClipkitError

FORMATS = {
    ".csv": "CSV",
    ".tsv": "TSV",
    ".tab": "TSV",
    ".parquet": "parquet",
    ".jsonl": "JSON lines",
    ".ndjson": "JSON lines",
    ".json": "JSON",
}
MANIFEST_SUFFIXES = tuple(FORMATS)
SUFFIX_HELP = (
    ".csv, .tsv / .tab (tab-separated, no quoting), .parquet, .jsonl / .ndjson (JSON lines) "
    "or .json (an array of row objects)"
)


class ManifestError(ClipkitError, ValueError):
    """A manifest that is missing, of an unknown format, unreadable, or without a needed column."""


def is_manifest(path: str | Path) -> bool:
    """Whether the suffix is one of ``MANIFEST_SUFFIXES`` (the file itself is not opened)."""
    return Path(path).suffix.lower() in FORMATS


def read_manifest(path: str | Path) -> Any:  # -> pandas.DataFrame
    """The manifest as a DataFrame of object columns holding ``str`` or ``None`` (module docstring).

    Columns keep the file's names and order; rows keep the file's order (index 0..n-1).
    """
    import pandas as pd

    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ManifestError(f"manifest '{path}' does not exist")
    if suffix not in FORMATS:
        raise ManifestError(
            f"manifest '{path}': unknown suffix '{suffix}'; a manifest is {SUFFIX_HELP}: "
            "rename the file to the suffix of its format"
        )
    try:
        if FORMATS[suffix] in ("CSV", "TSV"):
            table = _read_delimited(path, FORMATS[suffix] == "TSV")
            return table.astype(object).where(table != "", None)
        columns = _read_parquet(path) if suffix == ".parquet" else _read_json(path, suffix)
    except (OSError, ValueError) as e:  # pandas, pyarrow and json errors are ValueErrors
        raise ManifestError(
            f"cannot read manifest '{path}' as {FORMATS[suffix]}: {e}; "
            f"check that the file is {FORMATS[suffix]} (a manifest is {SUFFIX_HELP})"
        ) from None
    table = pd.DataFrame({name: pd.Series(values, dtype=object) for name, values in columns.items()})
    return table.reset_index(drop=True)


def find_column(table: Any, path: str | Path, role: str, names: Sequence[str], hint: str = "") -> str:
    """The first of ``names`` that ``table`` has, else a ``ManifestError`` naming what is there.

    ``role`` words the error ("image", "caption"); ``hint`` says what to do ("choose with --image-col").
    """
    for name in names:
        if name in table.columns:
            return name
    wanted = f"'{names[0]}'" + (f" (or {', '.join(repr(n) for n in names[1:])})" if len(names) > 1 else "")
    present = ", ".join(str(c) for c in table.columns) or "(none)"
    raise ManifestError(
        f"manifest '{path}' has no {role} column {wanted}; its columns are: {present}"
        + (f" ({hint})" if hint else "")
    )


def int_column(table: Any, path: str | Path, name: str) -> list[int]:
    """Column ``name`` as integers (``"3"`` and ``"3.0"`` read as 3); a missing or other cell raises."""
    out = []
    for row, cell in zip(table.index, table[name].tolist()):
        try:
            number = int(cell)  # exact, however large
        except (TypeError, ValueError):
            number = _integral_float(cell)
        if number is None:
            raise ManifestError(
                f"manifest '{path}': column '{name}' must hold integers, but row {row} holds "
                f"{'nothing' if cell is None else repr(cell)}"
            )
        out.append(number)
    return out


def _integral_float(cell: Any) -> int | None:
    try:
        number = float(cell)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def is_url(ref: str) -> bool:
    """Any scheme counts as a URL (a fetcher refuses all but http(s)); a path never."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", ref) is not None


def resolve_path(ref: str, base: str | Path) -> str:
    """An image reference of a manifest as a path or URL: URLs kept, ``~`` expanded, relative
    paths under ``base`` (the manifest's folder unless the user named another); ends stripped."""
    ref = ref.strip()
    if is_url(ref):
        return ref
    path = Path(os.path.expanduser(ref))
    return str(path if path.is_absolute() else Path(base) / path)


# ---------------------------------------------------------------------------- formats


def _read_delimited(path: Path, tsv: bool) -> Any:
    import pandas as pd

    # dtype=str: no type guessing ("007" stays "007"); keep_default_na=False: "NA" stays text,
    # empty fields read as "" (None in read_manifest); index_col=False: a row longer than the
    # header is an error, never silently an index.
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.ParserWarning)
        try:
            return pd.read_csv(
                path, sep="\t" if tsv else ",", dtype=str, keep_default_na=False, encoding="utf-8-sig",
                quoting=3 if tsv else 0, index_col=False,  # csv.QUOTE_NONE / csv.QUOTE_MINIMAL
            )  # fmt: skip
        except pd.errors.ParserWarning as e:
            raise ValueError(f"a row has more fields than the header ({e})") from None


def _read_parquet(path: Path) -> dict[str, list[str | None]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    return {
        str(name): [_text(v) for v in col.to_pylist()] for name, col in zip(table.column_names, table.columns)
    }


def _read_json(path: Path, suffix: str) -> dict[str, list[str | None]]:
    text = path.read_text(encoding="utf-8-sig")
    doc = _whole_json(text) if suffix == ".json" else None
    if isinstance(doc, dict) and doc and all(isinstance(v, dict) for v in doc.values()):
        index = list(dict.fromkeys(k for col in doc.values() for k in col))  # rows in order of appearance
        return {str(name): [_text(col.get(i)) for i in index] for name, col in doc.items()}
    if isinstance(doc, dict):
        doc = [doc]  # one row object (JSON lines of one line, or pretty-printed)
    rows = (
        doc
        if doc is not None
        else [_json_line(ln, n) for n, ln in enumerate(text.split("\n"), 1) if ln.strip()]
    )
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError("expected an array of row objects")
    names = list(dict.fromkeys(str(k) for r in rows for k in r))
    return {name: [_text(r.get(name)) for r in rows] for name in names}


def _whole_json(text: str) -> Any:
    """The document parsed whole, or None when it is not one JSON value (then: JSON lines)."""
    try:
        return json.loads(text)
    except ValueError:
        return None


def _json_line(line: str, number: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except ValueError as e:
        raise ValueError(f"line {number}: {e}") from None
    if not isinstance(row, dict):
        raise ValueError(f"line {number} is not a JSON object")  # noqa: TRY004 (bad content, not a bug)
    return row


def _text(value: Any) -> str | None:
    """A typed cell as text, or None when missing (the NA rule)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace") or None
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)
