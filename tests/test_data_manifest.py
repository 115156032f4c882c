"""The one manifest reader (clipkit.data.manifest): every suffix, the NA rule, its errors, and the
three commands that read manifests (data build, index embed, eval) giving the same rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipkit.data import sources as data_sources
from clipkit.data.manifest import (
    MANIFEST_SUFFIXES,
    ManifestError,
    find_column,
    int_column,
    is_manifest,
    read_manifest,
    resolve_path,
)
from clipkit.errors import ClipkitError
from clipkit.evaluation import folders as eval_folders
from clipkit.evaluation.source import EvalDataError
from clipkit.index import sources as index_sources

# The same four rows in every format: a caption that is the word "NA", one that is "null", a
# missing caption, and text that a type-guessing reader would turn into a number.
COLUMNS = ["image", "caption", "n"]
ROWS = [
    ["a.png", "NA", "007"],
    ["b.png", "null", "1.50"],
    ["c.png", None, "3"],
    ["d, e.png", 'say "hi"', None],
]
EXPECTED = [dict(zip(COLUMNS, r)) for r in ROWS]


def records(table: pd.DataFrame) -> list[dict]:
    return table.to_dict("records")


def write_csv(path: Path) -> None:
    # Written by hand, so the oracle does not depend on pandas' writer: an empty field is missing.
    path.write_text('image,caption,n\na.png,NA,007\nb.png,null,1.50\nc.png,,3\n"d, e.png","say ""hi""",\n')


def write_tsv(path: Path) -> None:
    # No quoting in TSV: the quotes of 'say "hi"' are text.
    path.write_text(
        'image\tcaption\tn\na.png\tNA\t007\nb.png\tnull\t1.50\nc.png\t\t3\nd, e.png\tsay "hi"\t\n'
    )


def write_parquet(path: Path) -> None:
    pq.write_table(pa.table({c: [r[i] for r in ROWS] for i, c in enumerate(COLUMNS)}), path)


def write_jsonl(path: Path) -> None:
    # The last row leaves "n" out: an absent key is missing, like null.
    lines = [json.dumps({c: v for c, v in zip(COLUMNS, r) if not (c == "n" and v is None)}) for r in ROWS]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # a blank line is skipped


def write_json_array(path: Path) -> None:
    path.write_text(json.dumps(EXPECTED, indent=1))


def write_json_columns(path: Path) -> None:
    pd.DataFrame(ROWS, columns=COLUMNS).to_json(path)  # pandas' default layout {"col": {"0": v}}


WRITERS = {
    ".csv": write_csv,
    ".tsv": write_tsv,
    ".tab": write_tsv,
    ".parquet": write_parquet,
    ".jsonl": write_jsonl,
    ".ndjson": write_jsonl,
    ".json": write_json_array,
}


def test_every_suffix_has_an_oracle():
    assert sorted(WRITERS) == sorted(MANIFEST_SUFFIXES)


@pytest.mark.parametrize("suffix", sorted(WRITERS))
def test_each_format_reads_the_same_rows(tmp_path, suffix):
    path = tmp_path / f"m{suffix.upper() if suffix == '.csv' else suffix}"  # suffixes are case-blind
    WRITERS[suffix](path)
    table = read_manifest(path)
    assert list(table.columns) == COLUMNS
    assert records(table) == EXPECTED
    assert list(table.index) == [0, 1, 2, 3]


def test_json_in_pandas_column_layout(tmp_path):
    write_json_columns(tmp_path / "m.json")
    assert records(read_manifest(tmp_path / "m.json")) == EXPECTED


def test_na_rule_in_csv(tmp_path):
    texts = ["NA", "N/A", "n/a", "null", "NULL", "None", "nan", "NaN", "#N/A", "-1.#IND", " ", "0", "False"]
    body = "".join(f"{t},x\n" for t in texts)
    (tmp_path / "m.csv").write_text('caption,other\n,x\n"",x\n' + body)
    got = read_manifest(tmp_path / "m.csv")["caption"].tolist()
    assert got == [None, None, *texts]  # only empty cells are missing; everything else stays text


def test_na_rule_in_typed_formats(tmp_path):
    pq.write_table(
        pa.table({
            "s": ["", None, "NA", " "],
            "i": pa.array([1, None, 3, 40], pa.int64()),
            "f": [1.0, float("nan"), 2.5, None],
            "b": [True, False, None, True],
        }),
        tmp_path / "m.parquet",
    )  # fmt: skip
    table = read_manifest(tmp_path / "m.parquet")
    assert records(table) == [
        {"s": None, "i": "1", "f": "1.0", "b": "true"},
        {"s": None, "i": None, "f": None, "b": "false"},
        {"s": "NA", "i": "3", "f": "2.5", "b": None},
        {"s": " ", "i": "40", "f": None, "b": "true"},
    ]
    (tmp_path / "m.jsonl").write_text(
        '{"s": "", "v": [1, "x"], "o": {"k": "é"}}\n{"s": null, "v": 2, "o": false}\n{"s": "null"}\n'
    )
    assert records(read_manifest(tmp_path / "m.jsonl")) == [
        {"s": None, "v": '[1, "x"]', "o": '{"k": "é"}'},
        {"s": None, "v": "2", "o": "false"},
        {"s": "null", "v": None, "o": None},
    ]


def test_short_row_has_missing_fields(tmp_path):
    (tmp_path / "m.csv").write_text("image,caption,n\na.png\nb.png,x,1\n")
    assert records(read_manifest(tmp_path / "m.csv")) == [
        {"image": "a.png", "caption": None, "n": None},
        {"image": "b.png", "caption": "x", "n": "1"},
    ]


def test_jsonl_text_with_unicode_line_separators_stays_one_row(tmp_path):
    caption = "line\u2028separator\u0085next"
    (tmp_path / "m.jsonl").write_text(json.dumps({"caption": caption}, ensure_ascii=False) + "\r\n", "utf-8")
    assert records(read_manifest(tmp_path / "m.jsonl")) == [{"caption": caption}]


def test_csv_with_a_byte_order_mark_and_utf8_text(tmp_path):
    (tmp_path / "m.csv").write_bytes("\ufeffimage,caption\nä.png,café ☕\n".encode())
    assert records(read_manifest(tmp_path / "m.csv")) == [{"image": "ä.png", "caption": "café ☕"}]


def test_header_only_is_an_empty_table_with_its_columns(tmp_path):
    (tmp_path / "m.csv").write_text("image,caption\n")
    table = read_manifest(tmp_path / "m.csv")
    assert list(table.columns) == ["image", "caption"] and len(table) == 0


# ---------------------------------------------------------------------------- errors


def test_unknown_suffix_names_the_file_and_the_formats(tmp_path):
    (tmp_path / "m.xlsx").write_text("image\na.png\n")
    with pytest.raises(ManifestError, match=r"manifest '.*m\.xlsx': unknown suffix '\.xlsx'; a manifest is "
                       r"\.csv, .*\.parquet.*: rename the file") as err:  # fmt: skip
        read_manifest(tmp_path / "m.xlsx")
    assert isinstance(err.value, ClipkitError) and not is_manifest(tmp_path / "m.xlsx")
    assert is_manifest("x/M.TSV") and is_manifest("a.ndjson")


def test_missing_file(tmp_path):
    with pytest.raises(ManifestError, match=r"manifest '.*nope\.csv' does not exist"):
        read_manifest(tmp_path / "nope.csv")


@pytest.mark.parametrize(
    "name,content,what",
    [
        ("m.parquet", b"not parquet at all", "parquet"),
        ("m.jsonl", b'{"image": "a.png"}\n{"image": \n', "JSON lines"),
        ("m.jsonl", b'{"image": "a.png"}\n[1, 2]\n', "JSON lines"),
        ("m.json", b'[{"image": "a.png"}, 3]', "JSON"),
        ("m.csv", b"image,caption\na.png,x,extra,fields\n", "CSV"),
        ("m.csv", b"image\n\xff\xfe.png\n", "CSV"),
    ],
)
def test_unreadable_file_names_it_and_its_format(tmp_path, name, content, what):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(
        ManifestError, match=rf"cannot read manifest '.*{name}' as {what}: .*check that the file"
    ):
        read_manifest(tmp_path / name)


def test_jsonl_error_gives_the_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"a": 1}\n\n"text"\n')
    with pytest.raises(ManifestError, match="line 3 is not a JSON object"):
        read_manifest(tmp_path / "m.jsonl")


def test_find_column_first_present_or_one_message(tmp_path):
    table = pd.DataFrame({"url": ["a"], "text": ["x"]})
    assert find_column(table, "m.csv", "caption", ["caption", "text"]) == "text"
    with pytest.raises(ManifestError) as err:
        find_column(table, "m.csv", "image", ["image", "path"], "choose with --image-col")
    assert str(err.value) == (
        "manifest 'm.csv' has no image column 'image' (or 'path'); its columns are: url, text "
        "(choose with --image-col)"
    )


def test_int_column(tmp_path):
    table = pd.DataFrame({"idx": ["3", "3.0", "-2", "007", "12345678901234567891"]}, dtype=object)
    assert int_column(table, "m.csv", "idx") == [3, 3, -2, 7, 12345678901234567891]  # no float rounding
    for bad, shown in [("2.5", "'2.5'"), ("x", "'x'"), (None, "nothing")]:
        table = pd.DataFrame({"idx": ["1", bad]}, dtype=object)
        with pytest.raises(ManifestError, match=f"column 'idx' must hold integers, but row 1 holds {shown}"):
            int_column(table, "m.csv", "idx")


def test_resolve_path(tmp_path):
    assert resolve_path(" img/a.png ", tmp_path) == str(tmp_path / "img" / "a.png")
    assert resolve_path("/abs/a.png", tmp_path) == "/abs/a.png"
    assert resolve_path("https://x.org/a.png", tmp_path) == "https://x.org/a.png"
    assert resolve_path("~/a.png", tmp_path) == str(Path.home() / "a.png")


# ---------------------------------------------------------------------------- the three readers agree


def caller_rows(path: Path) -> dict[str, list[tuple[str, str | None]]]:
    """(image path, caption or None) per row, as data build, index embed and eval read them."""
    items = data_sources.manifest_items(path, "image", ["caption"])
    build = [(it.ref, it.captions[0]) for it in items]
    src = index_sources.ManifestSource(path)
    index = [(s.source, s.caption or None) for p in src.parts() for s in src.read_part(p, images=False)]
    ds = eval_folders.ManifestSource(path)
    assert ds.task == "zeroshot_retrieval"
    evaluation = [(str(r["path"]), "\n".join(r["captions"]) or None) for r in ds.records]
    return {"data build": build, "index embed": index, "eval": evaluation}


@pytest.mark.parametrize("suffix", sorted(WRITERS))
def test_data_build_index_and_eval_read_the_same_rows(tmp_path, suffix):
    folder = tmp_path.resolve()
    for name in ("a.png", "b.png", "c.png", "d, e.png"):
        Image.new("RGB", (4, 4)).save(folder / name)
    path = folder / f"m{suffix}"
    WRITERS[suffix](path)
    expected = [(str(folder / r[0]), r[1]) for r in ROWS]
    got = caller_rows(path)
    assert got == {"data build": expected, "index embed": expected, "eval": expected}


def test_the_three_readers_raise_the_same_message(tmp_path):
    (tmp_path / "m.xlsx").write_text("image\na.png\n")
    expected = str(pytest.raises(ManifestError, read_manifest, tmp_path / "m.xlsx").value)
    calls = [
        (data_sources.SourceError, lambda: data_sources.manifest_items(tmp_path / "m.xlsx", "image", ["c"])),
        (index_sources.SourceError, lambda: index_sources.ManifestSource(tmp_path / "m.xlsx")),
        (EvalDataError, lambda: eval_folders.ManifestSource(tmp_path / "m.xlsx")),
    ]
    for error, call in calls:
        with pytest.raises(error) as err:
            call()
        assert str(err.value) == expected


def test_each_reader_says_which_image_column_it_needs(tmp_path):
    (tmp_path / "m.csv").write_text("url,caption\nx.png,a\n")
    data_message = r"no image column 'img'; its columns are: url, caption \(choose with --image-col\)"
    with pytest.raises(data_sources.SourceError, match=data_message):
        data_sources.manifest_items(tmp_path / "m.csv", "img", ["caption"])
    with pytest.raises(
        index_sources.SourceError, match=r"no image column 'path' \(or 'image'\); its columns"
    ):
        index_sources.ManifestSource(tmp_path / "m.csv")
    with pytest.raises(
        EvalDataError, match=r"no image column 'image' \(or 'image_path', .*'file'\); its columns"
    ):
        eval_folders.ManifestSource(tmp_path / "m.csv")


def test_missing_cells_in_each_reader(tmp_path):
    """A missing image: data build gets '' (counted as missing_image), index a missing_image sample, eval
    an error naming the row. A missing caption: None, '' and no caption."""
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "m.csv").write_text("image,caption,key,idx\na.png,,k0,5\n,gone,k1,6.0\n")
    items = list(data_sources.manifest_items(tmp_path / "m.csv", "image", ["caption"]))
    assert [(it.ref, it.captions) for it in items] == [(str(tmp_path / "a.png"), (None,)), ("", ("gone",))]
    src = index_sources.ManifestSource(tmp_path / "m.csv")
    samples = list(src.read_part(src.parts()[0]))
    assert [(s.key, s.idx, s.caption) for s in samples] == [("k0", 5, ""), ("k1", 6, "gone")]
    assert samples[0].error is None and samples[1].error.kind == "missing_image"
    text_only = list(src.read_part(src.parts()[0], images=False))
    assert [s.error for s in text_only] == [None, None]  # a caption needs no image
    with pytest.raises(EvalDataError, match="row 1 has no image path"):
        eval_folders.ManifestSource(tmp_path / "m.csv")
