"""``clipkit eval``: a suite end to end on a tiny open_clip model (every output file), the
single-task and first-cut forms, suite validation, and each bad input's one-line error."""

from __future__ import annotations

import csv
import json
import re

import pytest
import yaml
from eval_helpers import image_folder, manifest, tiny_open_clip_weights, wds_classification, wds_retrieval
from PIL import Image

from clipkit.cli.main import main
from clipkit.config import load_config, to_dict
from clipkit.evaluation.source import EvalDataError
from clipkit.evaluation.suite import SuiteError, parse_suite
from clipkit.training import checkpoint as ckpt


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    folder = tmp_path_factory.mktemp("w")
    return tiny_open_clip_weights(folder / "a.pt", seed=0), tiny_open_clip_weights(folder / "b.pt", seed=1)


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_suite_run_writes_every_output(tmp_path, weights, capsys):
    data = tmp_path / "data"
    suite = {
        "name": "tiny",
        "defaults": {"alpha": "drop"},
        "datasets": [
            {"name": "colors", "task": "zeroshot", "path": str(wds_classification(data / "colors"))},
            {
                "name": "colors_folder",
                "task": "zeroshot",
                "path": str(image_folder(data / "folder")),
                "templates": ["a photo of {c}.", "{c}"],
            },
            {
                "name": "caps",
                "task": "retrieval",
                "path": str(wds_retrieval(data / "caps")),
                "recall_k": [1, 5],
            },
            {"name": "caps_csv", "task": "retrieval", "path": str(manifest(data / "m", retrieval=True))},
            {"name": "probe", "task": "linear_probe", "path": str(data / "colors"), "holdout": 0.3},
        ],
    }
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(suite))
    specs = [f"open_clip:clipkit-tiny-ViT@{w}" for w in weights]
    out = tmp_path / "out"
    argv = ["eval", "all", "--suite", str(tmp_path / "suite.yaml"), "--output", str(out), "--batch-size", "8"]
    code, stdout, err = run_cli(
        [*argv, "--model", specs[0], "--model", specs[1], "--cache-dir", str(tmp_path / "c")], capsys
    )
    assert code == 0, stdout + err
    folders = sorted(p for p in out.iterdir() if p.is_dir() and p.name != "confusion")
    assert len(folders) == 2
    for folder in folders:
        names = sorted(p.name for p in folder.glob("*.json"))
        assert names == [
            "caps_csv_retrieval.json",
            "caps_retrieval.json",
            "colors_folder_zeroshot.json",
            "colors_zeroshot.json",
            "probe_linear_probe.json",
        ]
        result = json.loads((folder / "colors_zeroshot.json").read_text())
        assert list(result) == ["dataset", "model", "pretrained", "task", "metrics", "language"]
        assert result["dataset"] == "wds/colors" and result["model"] == "clipkit-tiny-ViT"
        assert set(result["metrics"]) == {"acc1", "mean_per_class_recall"}  # 3 classes: no acc5
        caps = json.loads((folder / "caps_retrieval.json").read_text())["metrics"]
        assert list(caps) == [f"{d}_retrieval_recall@{k}" for k in (1, 5) for d in ("image", "text")]
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["dataset", "task", "metric", *specs]
    assert {r["dataset"] for r in rows} == {"colors", "colors_folder", "caps", "caps_csv", "probe"}
    assert (out / "summary.md").read_text().startswith("| dataset | task | metric |")
    pngs = sorted(p.relative_to(out).as_posix().split("/")[-1] for p in out.rglob("*.png"))
    assert pngs == ["colors.png", "colors.png", "colors_folder.png", "colors_folder.png", "scores.png"]
    for png in out.rglob("*.png"):
        assert Image.open(png).size[0] > 100


def test_single_task_and_first_cut_forms(tmp_path, weights, capsys):
    data = wds_classification(tmp_path / "colors")
    spec = f"open_clip:clipkit-tiny-ViT@{weights[0]}"
    code, stdout, _ = run_cli(
        ["eval", "zeroshot", "--model", spec, "--dataset", str(data), "--output", str(tmp_path / "a")], capsys
    )
    assert code == 0 and "acc1" in stdout and not (tmp_path / "a" / "summary.csv").exists()
    first = json.loads(next((tmp_path / "a").rglob("*.json")).read_text())
    code, _, _ = run_cli(
        ["eval", "--model", spec, "--zeroshot", str(data), "--output", str(tmp_path / "b"), "--threads", "1"],
        capsys,
    )
    assert code == 0
    assert json.loads(next((tmp_path / "b").rglob("*.json")).read_text())["metrics"] == first["metrics"]


# ----------------------------------------------------------------------------- bad input


def expect_error(argv, capsys, match):
    code, _, err = run_cli(argv, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err  # one line, no traceback
    assert re.search(match, err), err


def test_dataset_without_classnames(tmp_path, weights, capsys):
    root = wds_classification(tmp_path / "pets")
    (root / "classnames.txt").unlink()
    argv = ["eval", "zeroshot", "--model", f"open_clip:clipkit-tiny-ViT@{weights[0]}", "--dataset", str(root)]
    expect_error(argv, capsys, r"clipkit eval: error: '.*pets' has no classnames\.txt")


def test_template_without_placeholder(tmp_path, weights, capsys):
    root = wds_classification(tmp_path / "pets")
    (tmp_path / "prompts.txt").write_text("a photo of a {c}.\na photo of a dog.\n")
    argv = ["eval", "zeroshot", "--model", f"open_clip:clipkit-tiny-ViT@{weights[0]}", "--dataset", str(root)]
    expect_error(
        [*argv, "--templates", str(tmp_path / "prompts.txt")],
        capsys,
        r"prompts\.txt:2: template 'a photo of a dog\.' must contain '\{c\}'",
    )
    with pytest.raises(
        EvalDataError, match=r"datasets\[0\]\.templates, template 2: template 'a dog' must contain"
    ):
        parse_suite(
            {
                "datasets": [
                    {"name": "x", "task": "zeroshot", "path": str(root), "templates": ["a {c}", "a dog"]}
                ]
            }
        )


def test_truncated_checkpoint(tmp_path, weights, capsys):
    cfg = load_config(None, [])
    bad = tmp_path / "run" / "checkpoints" / "step_00000001.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    root = wds_classification(tmp_path / "d")
    expect_error(
        ["eval", "zeroshot", "--model", str(bad), "--dataset", str(root)],
        capsys,
        r"cannot read checkpoint .* truncated or corrupt",
    )
    cut = tmp_path / "cut.pt"
    cut.write_bytes(weights[0].read_bytes()[:30000])
    expect_error(
        ["eval", "zeroshot", "--model", f"open_clip:clipkit-tiny-ViT@{cut}", "--dataset", str(root)],
        capsys,
        r"truncated or corrupt",
    )
    assert to_dict(cfg)  # (the config used above builds)


def test_checkpoint_from_another_architecture(tmp_path, capsys):
    rn = tiny_open_clip_weights(tmp_path / "rn.pt", config="clipkit-tiny-RN")
    root = wds_classification(tmp_path / "d")
    argv = ["eval", "zeroshot", "--model", f"open_clip:clipkit-tiny-ViT@{rn}", "--dataset", str(root)]
    expect_error(argv, capsys, r"do not fit open_clip config 'clipkit-tiny-ViT'.*another architecture")
    # A clipkit checkpoint whose weights do not fit the architecture its config describes.
    cfg = load_config(None, ["model.vision.name=open_clip:clipkit-tiny-ViT", "model.text.name=open_clip:clipkit-tiny-ViT",
                             "model.vision.weights=", "model.text.weights=", "model.projection=none", "model.embed_dim=32",
                             "model.vision.image_size=32", "model.text.context_length=16"])  # fmt: skip
    import torch

    path = ckpt.save(tmp_path / "run", 1, {"model": {"w": torch.zeros(2)}, "config": to_dict(cfg)})
    expect_error(
        ["eval", "zeroshot", "--model", str(path), "--dataset", str(root)],
        capsys,
        r"does not fit this model.*another architecture",
    )


def test_empty_datasets(tmp_path, weights, capsys):
    spec = f"open_clip:clipkit-tiny-ViT@{weights[0]}"
    empty = tmp_path / "empty"
    (empty / "test").mkdir(parents=True)
    (empty / "test" / "0.tar").write_bytes(b"\0" * 1024)  # a valid tar without members
    (empty / "classnames.txt").write_text("a\nb\n")
    (empty / "zeroshot_classification_templates.txt").write_text("{c}\n")
    expect_error(
        ["eval", "zeroshot", "--model", spec, "--dataset", str(empty)],
        capsys,
        r"yielded no samples: the dataset is empty",
    )
    (tmp_path / "f" / "cat").mkdir(parents=True)
    expect_error(
        ["eval", "zeroshot", "--model", spec, "--dataset", f"folder:{tmp_path / 'f'}"], capsys, r"is empty"
    )
    (tmp_path / "m.csv").write_text("image,caption\n")
    expect_error(
        ["eval", "retrieval", "--model", spec, "--dataset", str(tmp_path / "m.csv")],
        capsys,
        r"is empty: no rows",
    )


def test_suite_validation_and_task_mismatch(tmp_path, weights, capsys):
    root = str(wds_retrieval(tmp_path / "caps"))
    with pytest.raises(
        SuiteError, match=r"unknown suite key 'suite: datasets\[0\]\.templtes'; did you mean .*templates"
    ):
        parse_suite({"datasets": [{"name": "x", "task": "zeroshot", "path": root, "templtes": ["{c}"]}]})
    with pytest.raises(SuiteError, match=r"unknown task 'retreival'; did you mean 'retrieval'"):
        parse_suite({"datasets": [{"name": "x", "task": "retreival", "path": root}]})
    with pytest.raises(SuiteError, match="used twice"):
        parse_suite({"datasets": [{"name": "x", "task": "retrieval", "path": root}] * 2})
    spec = f"open_clip:clipkit-tiny-ViT@{weights[0]}"
    expect_error(
        ["eval", "zeroshot", "--model", spec, "--dataset", root],
        capsys,
        r"is a retrieval \(captions\) dataset; it cannot be evaluated as zeroshot",
    )
    expect_error(
        ["eval", "all", "--model", spec, "--suite", str(tmp_path / "nope.yaml")],
        capsys,
        r"suite '.*nope.yaml' not found",
    )
