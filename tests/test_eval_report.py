"""Result files in CLIP_benchmark's format, written atomically; the printed table."""

from __future__ import annotations

import json
import math

import pytest

from clipkit.errors import ClipkitError
from clipkit.evaluation.report import format_table, result_json, write_result


def test_result_json_is_clip_benchmark_format():
    got = result_json(
        "wds/cifar10", "ViT-B-32", "laion2b_s34b_b79k", "zeroshot_classification", {"acc1": 0.5}
    )
    # Keys and their order as clip_benchmark/cli.py `dump`.
    assert list(got) == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    assert got["metrics"] == {"acc1": 0.5} and got["language"] == "en"
    with pytest.raises(ClipkitError, match="did you mean 'zeroshot_retrieval'"):
        result_json("d", "m", "p", "zeroshot_retreival", {})


def test_write_result_atomic_and_overwrites(tmp_path):
    path = tmp_path / "out" / "result.json"
    write_result(path, "d", "m", "p", "zeroshot_retrieval", {"image_retrieval_recall@5": 0.25})
    write_result(path, "d", "m", "p", "zeroshot_retrieval", {"image_retrieval_recall@5": 0.75})
    assert json.loads(path.read_text())["metrics"] == {"image_retrieval_recall@5": 0.75}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temporary left


def test_write_result_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_result(path, "d", "m", "p", "zeroshot_classification", {"acc1": 0.5})

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", broken_fsync)  # fails after the new bytes are written
    with pytest.raises(OSError, match="disk full"):
        write_result(path, "d", "m", "p", "zeroshot_classification", {"acc1": 0.9})
    assert json.loads(path.read_text())["metrics"] == {"acc1": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_format_table_aligns_columns():
    rows = [
        {"model": "before", "acc1": 0.5, "acc5": 0.91234},
        {"model": "after-finetune", "acc1": 0.625, "acc5": math.nan, "note": "x"},
    ]
    assert format_table(rows).splitlines() == [
        "model             acc1    acc5  note",
        "--------------  ------  ------  ----",
        "before          0.5000  0.9123  -",
        "after-finetune  0.6250     nan  x",
    ]
    assert format_table(rows, columns=["acc1"], digits=2).splitlines()[2] == "0.50"
