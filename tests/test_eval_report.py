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


# ----------------------------------------------------------------------------- suite summary and charts


ROWS = [
    {"model": "m1", "dataset": "pets", "task": "zeroshot_classification", "metric": "acc1", "value": 0.5},
    {"model": "m1", "dataset": "pets", "task": "zeroshot_classification", "metric": "acc5", "value": 0.9},
    {
        "model": "m1",
        "dataset": "coco",
        "task": "zeroshot_retrieval",
        "metric": "image_retrieval_recall@1",
        "value": 0.25,
    },
    {
        "model": "m1",
        "dataset": "coco",
        "task": "zeroshot_retrieval",
        "metric": "text_retrieval_recall@1",
        "value": 0.3,
    },
    {"model": "m2", "dataset": "pets", "task": "zeroshot_classification", "metric": "acc1", "value": 0.75},
    {
        "model": "m2",
        "dataset": "coco",
        "task": "zeroshot_retrieval",
        "metric": "image_retrieval_recall@1",
        "value": 0.125,
    },
]


def test_summary_table_wide_in_first_seen_order(tmp_path):
    from clipkit.evaluation.report import write_summary

    df = write_summary(ROWS, tmp_path)
    assert list(df.columns) == ["dataset", "task", "metric", "m1", "m2"]
    assert df[["dataset", "metric"]].values.tolist() == [
        ["pets", "acc1"],
        ["pets", "acc5"],
        ["coco", "image_retrieval_recall@1"],
        ["coco", "text_retrieval_recall@1"],
    ]
    m2 = df["m2"].tolist()
    assert m2[0] == 0.75 and m2[2] == 0.125 and math.isnan(m2[1]) and math.isnan(m2[3])
    md = (tmp_path / "summary.md").read_text().splitlines()
    assert md[0] == "| dataset | task | metric | m1 | m2 |"
    assert md[2] == "| pets | zeroshot_classification | acc1 | 0.5000 | 0.7500 |"
    assert md[3].endswith("| 0.9000 | nan |")
    assert (tmp_path / "summary.csv").read_text().splitlines()[0] == "dataset,task,metric,m1,m2"


def test_charts_are_pngs(tmp_path):
    import numpy as np
    from PIL import Image

    from clipkit.evaluation.plots import bar_chart, confusion_matrix, confusion_png

    bar_chart(ROWS, tmp_path / "scores.png", "t")
    labels, pred = np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 0, 2])
    from sklearn.metrics import confusion_matrix as sk_confusion

    assert confusion_matrix(labels, pred, 4).tolist() == sk_confusion(labels, pred, labels=range(4)).tolist()
    confusion_png(labels, pred, ["a", "b", "c", "d"], tmp_path / "cm" / "x.png", "title")
    for p in (tmp_path / "scores.png", tmp_path / "cm" / "x.png"):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 200
