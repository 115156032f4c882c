"""End to end through ``clipkit index ...`` with the tiny colour model: embed, build, query, merge."""

from __future__ import annotations

import json

import pytest
from index_helpers import square_png, write_squares

from clipkit.cli.main import main

MODEL = "index_helpers:color_model"


def test_embed_build_query_merge(tmp_path, capsys):
    write_squares(tmp_path / "images")
    emb, idx = str(tmp_path / "emb"), str(tmp_path / "idx")
    assert main(["index", "embed", "--model", MODEL, "--folder", str(tmp_path / "images"), "--out", emb,
                 "--part-size", "8"]) == 0  # fmt: skip
    assert "30 embeddings of width 16" in capsys.readouterr().out
    assert main(["index", "build", emb, "--out", idx, "--memory", "64MB", "--threads", "1"]) == 0
    assert "Flat {}: recall@10 1.0" in capsys.readouterr().out

    assert main(["index", "query", idx, "--text", "a green square", "--k", "3", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["query"] == {"text": "a green square"}
    assert [r["key"][:6] for r in result["results"]] == ["green_"] * 3
    assert {"key", "caption", "score", "source", "shard", "offset", "idx"} <= set(result["results"][0])

    (tmp_path / "red.png").write_bytes(square_png("red"))
    (tmp_path / "batch.jsonl").write_text(
        json.dumps({"text": "blue"}) + "\n" + json.dumps({"image": str(tmp_path / "red.png")}) + "\n"
    )
    assert main(["index", "query", idx, "--batch", str(tmp_path / "batch.jsonl"), "--k", "2"]) == 0
    table = capsys.readouterr().out
    assert table.count("query:") == 2 and "blue_0" in table and "red_0" in table and "score" in table

    assert main(["index", "merge", idx, idx + "_copy", "--out", str(tmp_path / "m")]) == 2  # no such folder
    assert "not a complete index folder" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_squares(root / "images", shades=1)
    assert (
        main(["index", "embed", "--model", MODEL, "--folder", str(root / "images"), "--out", str(root / "e")])
        == 0
    )
    assert main(["index", "build", str(root / "e"), "--out", str(root / "i")]) == 0
    return root / "i"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--text", "   "], "empty query"),
        (["--image", "/no/such.png"], "does not exist"),
        (["--text", "red", "--model", "index_helpers:wide_model"], "embeds to 24-d"),
        (["--text", "red", "--k", "0"], "k must be between 1 and 10000"),
        (["--text", "red", "--k", str(10**9)], "k must be between 1 and 10000"),
    ],
)
def test_query_errors_exit_2_with_a_message(small_index, capsys, argv, message):
    capsys.readouterr()
    assert main(["index", "query", str(small_index), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipkit index: error:") and message in err
