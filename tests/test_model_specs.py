"""Every model spec kind through ``clipkit eval``, ``clipkit index embed`` and ``clipkit export``.

Parametrized over ``MODEL_SPECS.names()``: a new kind without a fixture here fails. For each
kind, the oracle is agreement: the vectors ``index embed`` stores equal the embeddings that
``clipkit eval`` computes (``embed_dataset`` over the same images), the exported open_clip
model embeds images and texts as the spec's model does, and ``clipkit eval`` scores the
exported model exactly as it scores the spec.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip  # noqa: F401  (a hard dependency: a broken install fails here)
import pytest
import torch
from eval_helpers import tiny_hf_model, tiny_open_clip_weights
from PIL import Image

from clipkit.cli.main import main
from clipkit.config import load_config, to_dict
from clipkit.evaluation.datasets import write_clip_benchmark_wds
from clipkit.evaluation.dataspec import open_dataset
from clipkit.evaluation.embed import embed_dataset
from clipkit.index.store import EmbeddingSet
from clipkit.models import build_model
from clipkit.models.embed import encode_texts, eval_mode
from clipkit.models.export import ExportError, export_open_clip
from clipkit.models.specs import CLIPKIT_CONFIGS, MODEL_SPECS, ModelSpecError, load_model, spec_kind
from clipkit.training import checkpoint as ckpt

TINY = {  # clipkit-tiny-ViT on both sides, no projection heads: exportable as open_clip
    "model.vision.name": "open_clip:clipkit-tiny-ViT",
    "model.vision.weights": "",
    "model.vision.image_size": 32,
    "model.text.name": "open_clip:clipkit-tiny-ViT",
    "model.text.weights": "",
    "model.text.context_length": 16,
    "model.projection": "none",
    "model.embed_dim": 32,
}
WORDS = ["red", "green", "blue", "cat", "dog", "sun"]


def tiny_dual_encoder() -> torch.nn.Module:
    """``--model test_model_specs:tiny_dual_encoder``: the module:function kind."""
    cfg = load_config(None, [f"{k}={v}" for k, v in TINY.items()])
    torch.manual_seed(3)
    return build_model(cfg.model)


def _retrieval_set(root: Path) -> Path:
    # At the models' input size: a Hugging Face image processor and open_clip's torchvision
    # resize may round a resized pixel to neighbouring intensity levels (export allows that);
    # without a resize they agree, so embeddings can be compared to 1e-5.
    rng = np.random.default_rng(0)
    samples = [
        {
            "image": Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
            "captions": [f"a {WORDS[i % 6]} {WORDS[(i * 5) % 6]}", f"{WORDS[(i + 2) % 6]} things"][
                : 1 + i % 2
            ],
            "key": f"k{i:02d}",
        }
        for i in range(8)
    ]
    write_clip_benchmark_wds(root, samples, samples_per_shard=8)
    return root


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> dict[str, str]:
    """One spec of every kind, all tiny and built offline."""
    tmp = tmp_path_factory.mktemp("specs")
    cfg = load_config(None, [f"{k}={v}" for k, v in TINY.items()])
    torch.manual_seed(0)
    path = ckpt.save(tmp / "run", 10, {"model": build_model(cfg.model).state_dict(), "config": to_dict(cfg)})
    config = tmp / "my-tiny.json"
    shutil.copyfile(CLIPKIT_CONFIGS / "clipkit-tiny-ViT.json", config)
    weights = tiny_open_clip_weights(tmp / "tiny.pt", seed=2)
    recipe = tmp / "recipe.yaml"
    model = {k.removeprefix("model."): v for k, v in TINY.items()}
    tree: dict = {}
    for dotted, value in model.items():
        *parents, leaf = dotted.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    recipe.write_text(json.dumps({"model": tree}))  # JSON is YAML
    return {
        "run_folder": str(tmp / "run"),
        "checkpoint": str(path),
        "open_clip": f"open_clip:{config}@{weights}",
        "hf_clip": f"hf-clip:{tiny_hf_model(tmp / 'hf', 'clip')}",
        "recipe": str(recipe),
        "module_function": "test_model_specs:tiny_dual_encoder",
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _retrieval_set(tmp_path_factory.mktemp("wds"))


def _eval(spec: str, data: Path, out: Path) -> dict:
    argv = ["eval", "retrieval", "--model", spec, "--dataset", str(data), "--output", str(out)]
    assert main([*argv, "--threads", "1", "--device", "cpu", "--batch-size", "4"]) == 0
    (result,) = out.glob("*/*_retrieval.json")
    return json.loads(result.read_text())


def _index_vectors(spec: str, data: Path, out: Path) -> dict[str, np.ndarray]:
    argv = ["index", "embed", "--model", spec, "--shards", str(data / "test" / "0.tar"), "--out", str(out)]
    assert main([*argv, "--dtype", "float32", "--batch-size", "3"]) == 0
    emb = EmbeddingSet(out)
    vectors = np.concatenate([v for _, v in emb.iter_parts()])
    return dict(zip(emb.metadata().column("key").to_pylist(), vectors))


@pytest.mark.parametrize("kind", MODEL_SPECS.names())
def test_every_spec_kind_works_in_eval_index_and_export(kind, specs, dataset, tmp_path, capsys):
    assert kind in specs, f"no fixture for model spec kind '{kind}': add one to specs()"
    spec = specs[kind]
    assert spec_kind(spec) == kind
    scores = _eval(spec, dataset, tmp_path / "eval")
    stored = _index_vectors(spec, dataset, tmp_path / "index")
    assert main(["export", "--model", spec, "--out", str(tmp_path / "export")]) == 0  # checks 1e-5 itself
    assert "open_clip reproduces its embeddings" in capsys.readouterr().out

    model = load_model(spec)
    data = open_dataset(str(dataset))
    embedded = embed_dataset(model, data, batch_size=4, texts=True)  # what clipkit eval computes
    assert sorted(stored) == embedded.keys
    for key, row in zip(embedded.keys, embedded.image_emb):
        np.testing.assert_allclose(stored[key], row.numpy(), atol=1e-6)

    exported = load_model(f"open_clip:local-dir:{tmp_path / 'export'}")
    again = embed_dataset(exported, data, batch_size=4, texts=True)
    torch.testing.assert_close(again.image_emb, embedded.image_emb, atol=1e-5, rtol=0)
    torch.testing.assert_close(again.text_emb, embedded.text_emb, atol=1e-5, rtol=0)
    with eval_mode(model), eval_mode(exported):
        torch.testing.assert_close(
            encode_texts(exported, WORDS, torch.device("cpu")),
            encode_texts(model, WORDS, torch.device("cpu")),
            atol=1e-5,
            rtol=0,
        )
    rescored = _eval(f"open_clip:local-dir:{tmp_path / 'export'}", dataset, tmp_path / "eval_export")
    assert rescored["metrics"] == pytest.approx(scores["metrics"], abs=1e-12)


def test_a_factory_without_an_open_clip_form_is_refused_with_the_reason(tmp_path):
    with pytest.raises(
        ExportError, match=r"'index_helpers:color_model' .* is a ColorModel, which has no open_clip"
    ):
        export_open_clip("index_helpers:color_model", tmp_path / "out")
    assert not (tmp_path / "out" / "open_clip_model.safetensors").exists()


def test_unknown_specs_and_misplaced_overrides(specs):
    with pytest.raises(ModelSpecError) as err:
        load_model("runs/no-such-run")
    for kind in MODEL_SPECS.names():  # the message lists every form
        assert MODEL_SPECS.get(kind).form in str(err.value)
    with pytest.raises(ModelSpecError, match="did you mean 'hf-clip'"):
        load_model("hf_clip:/x")
    hf_folder = specs["hf_clip"].removeprefix("hf-clip:")
    with pytest.raises(ModelSpecError, match=f"did you mean --model hf-clip:{hf_folder}"):
        load_model(hf_folder)  # a folder, but not a run folder
    with pytest.raises(ModelSpecError, match="apply to a recipe .yaml only"):
        load_model(specs["checkpoint"], ["model.embed_dim=8"])
    recipe = load_model(specs["recipe"], ["model.vision.image_size=48"])
    assert recipe.image_transform(False)(Image.new("RGB", (60, 50))).shape == (3, 48, 48)


def test_the_resolved_spec_reloads_the_same_model(specs):
    for kind, spec in specs.items():
        model = load_model(spec)
        again = load_model(model.resolved)
        assert spec_kind(model.resolved) == ("checkpoint" if kind == "run_folder" else kind)
        with eval_mode(model), eval_mode(again):
            torch.testing.assert_close(
                encode_texts(again, WORDS, torch.device("cpu")),
                encode_texts(model, WORDS, torch.device("cpu")),
            )
