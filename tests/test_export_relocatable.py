"""A ``clipkit export`` folder still loads after it is copied elsewhere and the original deleted:
through clipkit (``load_model``, an open_clip tower), and through open_clip alone the two ways the
folder's README.md gives (``relink`` once, or the ``text_cfg`` keyword). Each embeds the test
images and texts as the model that was exported, to 1e-5."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from test_eval_export import embeddings, save_run

from clipkit.models.export import export_open_clip
from clipkit.models.local_dir import relink
from clipkit.models.specs import load_model
from clipkit.models.towers_openclip import create_open_clip

NAME = "clipkit-moved"


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    """(the copy's folder, the exported model's embeddings); the original folder is gone."""
    tmp = tmp_path_factory.mktemp("relocate")
    run, model = save_run(tmp, ["model.vision.image_size=64"])  # EfficientNet-Lite0 + MiniLM, linear heads
    want = embeddings(
        lambda x: model.encode_image(image=x, normalize=False),
        lambda t: model.encode_text(t, normalize=False),
        model.image_transform(False),
        model.tokenize,
    )
    original = tmp / "written" / "export"
    export_open_clip(str(run), original, name=NAME, check=False)
    copy = Path(shutil.copytree(original, tmp / "elsewhere" / "copy"))
    shutil.rmtree(tmp / "written")
    # The scenario: open_clip's config still names where the folder was written, which is gone.
    text_cfg = json.loads((copy / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == str(original.resolve()) and not original.exists()
    return copy, want


def assert_embeds_like(got, want):
    for g, w in zip(got, want):  # (2, D) images, (3, D) texts
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_clipkit_loads_the_copy(moved):
    copy, want = moved
    m = load_model(f"open_clip:local-dir:{copy}")
    assert m.resolved == f"open_clip:local-dir:{copy.resolve()}"
    got = embeddings(
        lambda x: m.encode_image(x, normalize=False),
        lambda t: m.encode_text(t, normalize=False),
        m.image_transform(False),
        m.tokenize,
    )
    assert_embeds_like(got, want)


def test_the_copy_builds_as_an_open_clip_tower(moved):
    copy, want = moved
    oc, name, cfg = create_open_clip(f"local-dir:{copy}", "bundled", None, None)
    assert cfg["text_cfg"]["hf_model_name"] == str(copy.resolve())
    tok = open_clip.get_tokenizer(name)
    preprocess = image_transform_v2(PreprocessCfg(**oc.visual.preprocess_cfg), is_train=False)
    assert_embeds_like(embeddings(oc.eval().encode_image, oc.encode_text, preprocess, tok), want)


def test_open_clip_alone_loads_the_copy_with_the_readme_keyword(moved):
    copy, want = moved
    readme = (copy / "README.md").read_text()
    assert '"hf_model_name": FOLDER, "hf_model_pretrained": False' in readme
    folder = str(copy)  # what the README's snippet does, with FOLDER = the copy
    assert 'text_cfg = open_clip.get_model_config(f"local-dir:{FOLDER}")["text_cfg"]' in readme
    text_cfg = open_clip.get_model_config(f"local-dir:{folder}")["text_cfg"]
    oc, _, preprocess = open_clip.create_model_and_transforms(
        f"local-dir:{folder}", text_cfg={**text_cfg, "hf_model_name": folder, "hf_model_pretrained": False}
    )
    tok = open_clip.get_tokenizer(f"local-dir:{folder}")
    assert_embeds_like(embeddings(oc.eval().encode_image, oc.encode_text, preprocess, tok), want)


def test_relink_then_open_clip_loads_the_copy_both_ways(moved, tmp_path):
    copy = Path(shutil.copytree(moved[0], tmp_path / "relinked"))  # the module's copy stays unlinked
    want = moved[1]
    assert relink(copy) == [copy / "open_clip_config.json", copy / f"{NAME}.json"]
    # 1. The folder, as open_clip's local-dir: model.
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{copy}")
    tok = open_clip.get_tokenizer(f"local-dir:{copy}")
    assert_embeds_like(embeddings(oc.eval().encode_image, oc.encode_text, preprocess, tok), want)
    # 2. By name, with the weights file as `pretrained` (what CLIP_benchmark does).
    open_clip.add_model_config(copy / f"{NAME}.json")
    oc2, _, preprocess2 = open_clip.create_model_and_transforms(
        NAME,
        pretrained=str(copy / "open_clip_model.safetensors"),
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        image_interpolation="bicubic",
    )
    got2 = embeddings(oc2.eval().encode_image, oc2.encode_text, preprocess2, open_clip.get_tokenizer(NAME))
    assert_embeds_like(got2, want)


def test_a_moved_folder_without_the_marker_names_the_fix(moved, tmp_path):
    # An export written before the folder keys were recorded: a one-line error, not open_clip's
    # "Repo id must be in the form ..." or a claim that the weights are corrupt.
    copy = Path(shutil.copytree(moved[0], tmp_path / "old"))
    data = json.loads((copy / "open_clip_config.json").read_text())
    del data["clipkit_export"]
    (copy / "open_clip_config.json").write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"text_cfg\.hf_model_name '.*' .* is not a folder with a config\.json"
    ):
        load_model(f"open_clip:local-dir:{copy}")
