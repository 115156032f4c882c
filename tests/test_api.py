"""The public Python API: the README's example runs as written, and each call agrees with the
modules the CLI uses (oracles: the adapter's own encode, CLIP_benchmark-style class weights,
brute-force search over the stored embeddings)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from training_helpers import write_shards

import clipkit
from clipkit.cli.main import main
from clipkit.evaluation.zeroshot import build_classifier
from clipkit.index.store import EmbeddingSet
from clipkit.models.specs import load_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, one_thread):
    """A folder laid out as the README example expects: recipe, shards, two images, an index."""
    root = tmp_path_factory.mktemp("api")
    (root / "train").mkdir()
    shutil.copy(ROOT / "train" / "tiny_openclip.yaml", root / "train")
    write_shards(root / "data" / "emoji" / "train", n_shards=2, per_shard=32)
    Image.new("RGB", (40, 40), (200, 120, 40)).save(root / "cat.png")
    Image.new("RGBA", (50, 30), (20, 60, 200, 255)).save(root / "dog.png")
    old = Path.cwd()
    os.chdir(root)
    try:
        spec = "train/tiny_openclip.yaml"  # a recipe spec: seeded, so the index's model reloads exactly
        assert (
            main(
                [
                    "index",
                    "embed",
                    "--model",
                    spec,
                    "--shards",
                    "data/emoji/train/train-{000000..000001}.tar",
                    "--out",
                    "emb",
                ]
            )
            == 0
        )
        assert main(["index", "build", "emb", "--out", "indexes/emoji", "--threads", "1"]) == 0
        yield root
    finally:
        os.chdir(old)


def test_readme_example_runs_as_written(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    scope: dict = {}
    exec(compile(readme_example(), "README.md:Python API", "exec"), scope)  # noqa: S102 (our own README)
    run, model, img, txt, clf = (scope[k] for k in ("run", "model", "img", "txt", "clf"))
    assert (Path(run) / "checkpoints").is_dir() and model.resolved.endswith(".pt")
    assert img.shape == (2, 32) and txt.shape == (2, 32)
    assert torch.allclose(img.norm(dim=1), torch.ones(2), atol=1e-5)
    assert set(clf.predict(scope["images"])) <= {"cat", "dog"}
    assert len(scope["index"].search("red heart", k=3)) == 3
    assert "api_demo" in str(run)


def test_encode_matches_the_adapter_and_accepts_every_input_form(workdir):
    model = clipkit.load(str(workdir / "train" / "tiny_openclip.yaml"))
    inner = load_model(str(workdir / "train" / "tiny_openclip.yaml"))
    ims = [Image.open(workdir / "cat.png"), Image.open(workdir / "dog.png").convert("RGB")]
    x = torch.stack([inner.image_transform(False)(im) for im in ims])
    with torch.no_grad():
        want_img = inner.encode_image(x, normalize=True)
        want_txt = inner.encode_text(inner.tokenize(["a cat", "a dog"]), normalize=True)
    assert torch.allclose(model.encode_image(ims), want_img, atol=1e-6)
    assert torch.allclose(
        model.encode_image([workdir / "cat.png", str(workdir / "dog.png")]), want_img, atol=1e-6
    )
    assert torch.allclose(model.encode_image(x), want_img, atol=1e-6)
    assert torch.allclose(model.encode_image(x[0]), want_img[:1], atol=1e-6)
    assert torch.allclose(model.encode_text(["a cat", "a dog"]), want_txt, atol=1e-6)
    assert torch.allclose(model.encode_text("a dog"), want_txt[1:], atol=1e-6)
    small = clipkit.api.Model(inner, batch_size=1)  # batching must not change a row
    assert torch.allclose(small.encode_text(["a cat", "a dog"]), want_txt, atol=1e-6)
    with pytest.raises(clipkit.api.ApiError, match="image 0 is a int"):
        model.encode_image([3])


def test_zeroshot_classifier_is_clip_benchmarks_weights(workdir):
    model = clipkit.load(str(workdir / "train" / "tiny_openclip.yaml"))
    names, templates = ["cat", "dog", "bird"], ["a photo of a {c}.", "a {c}"]
    clf = clipkit.zeroshot_classifier(model, names, templates)
    # by hand: mean of each class's unit prompt embeddings, renormalised
    rows = []
    for c in names:
        e = model.encode_text([t.format(c=c) for t in templates]).mean(0)
        rows.append(e / e.norm())
    assert torch.allclose(clf.weights, torch.stack(rows), atol=1e-5)
    assert torch.allclose(clf.weights, build_classifier(model.inner, names, templates), atol=1e-6)
    ims = [Image.open(workdir / "cat.png"), Image.open(workdir / "dog.png")]
    logits = 100 * model.encode_image(ims) @ clf.weights.T
    assert torch.allclose(clf.logits(ims), logits, atol=1e-4)
    assert clf.predict(ims) == [names[i] for i in logits.argmax(1).tolist()]
    assert torch.allclose(clf(ims).sum(1), torch.ones(2), atol=1e-5)


def test_index_search_equals_brute_force_and_the_recorded_model(workdir):
    index = clipkit.Index.load(workdir / "indexes" / "emoji")
    stored = EmbeddingSet(workdir / "emb")
    vectors = stored.take(np.arange(stored.n))  # (N, 32) float32
    keys = stored.metadata().column("key").to_pylist()
    q = (
        clipkit.load(str(workdir / "train" / "tiny_openclip.yaml"))
        .encode_text(["red heart", "blue sky"])
        .numpy()
    )
    order = np.argsort(-(q @ vectors.T), axis=1)[:, :5]  # brute force, (2, 5)
    got = index.search(q, k=5)
    assert [[r["key"] for r in rows] for rows in got] == [[keys[i] for i in o] for o in order]
    assert [r["key"] for r in index.search("red heart", k=5)] == [keys[i] for i in order[0]]
    assert [r["key"] for r in index.search(q[1], k=5)] == [keys[i] for i in order[1]]
    by_image = index.search([workdir / "cat.png"], k=2)
    assert len(by_image) == 1 and len(by_image[0]) == 2
    assert len(index) == len(keys) and index.dim == 32


def test_train_takes_a_config_dict_and_overrides(workdir, monkeypatch):
    import yaml

    monkeypatch.chdir(workdir)
    tree = yaml.safe_load((workdir / "train" / "tiny_openclip.yaml").read_text())
    run = clipkit.train(tree, ["train.samples=64", "train.run_name=api_dict"])
    assert run.name == "api_dict" and (run / "config.yaml").is_file()
    with pytest.raises(clipkit.api.ApiError, match="recipe path, a dict or a Config"):
        clipkit.train(42)
