"""Model specs -> EvalModel adapters, checked against the libraries they wrap (open_clip,
transformers, clipkit's DualEncoder), plus the errors a bad spec or bad weights give."""

from __future__ import annotations

import re

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from eval_helpers import tiny_hf_model, tiny_open_clip_weights
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clipkit.config import load_config, to_dict
from clipkit.evaluation.zeroshot import build_classifier
from clipkit.models import build_model
from clipkit.models.specs import ModelSpecError, safe_name
from clipkit.models.specs import load_model as load_eval_model
from clipkit.training import checkpoint as ckpt


def photo(seed: int, size=(40, 30)) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr)


# ----------------------------------------------------------------------------- names


@given(st.text(min_size=0, max_size=200))
@settings(max_examples=300, deadline=None)
def test_safe_name_is_a_plain_file_name(spec):
    name = safe_name(spec)
    assert re.fullmatch(r"[A-Za-z0-9._+-]+", name)
    assert ".." not in name and not name.startswith((".", "-")) and len(name) <= 69


@given(st.lists(st.text(max_size=30), min_size=2, max_size=20, unique=True))
@settings(max_examples=100, deadline=None)
def test_safe_name_keeps_specs_apart(specs):
    assert len({safe_name(s) for s in specs}) == len(specs)


def test_safe_name_examples():
    assert safe_name("ViT-B-32") == "ViT-B-32"  # already safe: unchanged
    # CLIP_benchmark 1.6.2 puts a local-dir: model name into its output path as is and fails.
    name = safe_name("open_clip:local-dir:/models/my clip/")
    assert name.startswith("open_clip_local-dir_models_my_clip-") and "/" not in name
    assert safe_name("../../etc/passwd") != safe_name("etc/passwd")


# ----------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    return tiny_open_clip_weights(tmp_path_factory.mktemp("oc") / "tiny.pt")


def test_open_clip_spec_equals_open_clip(tiny_weights):
    model = load_eval_model(f"open_clip:clipkit-tiny-ViT@{tiny_weights}")
    ref, _, preprocess = open_clip.create_model_and_transforms(
        "clipkit-tiny-ViT", pretrained=str(tiny_weights)
    )
    ref.eval()
    tok = open_clip.get_tokenizer("clipkit-tiny-ViT")
    images = torch.stack([preprocess(photo(i)) for i in range(3)])
    assert torch.equal(torch.stack([model.image_transform()(photo(i)) for i in range(3)]), images)
    texts = ["a photo of a cat", "a dog"]
    assert torch.equal(model.tokenize(texts), tok(texts))
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_image(image=images), ref.encode_image(images, normalize=True))
        torch.testing.assert_close(model.encode_text(tok(texts)), ref.encode_text(tok(texts), normalize=True))
    assert (model.name, model.pretrained) == ("clipkit-tiny-ViT", str(tiny_weights))
    assert len(model.fingerprint()) == 16


def test_open_clip_config_file_and_fingerprint(tmp_path, tiny_weights):
    from clipkit.models.specs import CLIPKIT_CONFIGS

    cfg = tmp_path / "my-tiny.json"
    cfg.write_text((CLIPKIT_CONFIGS / "clipkit-tiny-ViT.json").read_text())
    a = load_eval_model(f"open_clip:{cfg}@{tiny_weights}")
    b = load_eval_model(f"open_clip:clipkit-tiny-ViT@{tiny_weights}")
    assert a.name == "my-tiny" and a.fingerprint() == b.fingerprint()
    other = tiny_open_clip_weights(tmp_path / "other.pt", seed=1)
    assert load_eval_model(f"open_clip:clipkit-tiny-ViT@{other}").fingerprint() != b.fingerprint()


@pytest.mark.parametrize(
    "spec,match",
    [
        (
            "open_clip:clipkit-tiny-ViTT",
            r"unknown open_clip config 'clipkit-tiny-ViTT'; did you mean 'clipkit-tiny-ViT'",
        ),
        ("open_clip:clipkit-tiny-ViT@/no/such.pt", r"weights file '/no/such.pt' not found"),
        ("open-clip:ViT-B-32", r"model 'open-clip:ViT-B-32' not found; did you mean 'open_clip'"),
        ("runs/does-not-exist", r"not found; a model is a clipkit run folder"),
        ("hf-clip:/no/such/dir", r"not a local Hugging Face model folder"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(ModelSpecError, match=match):
        load_eval_model(spec)


def test_truncated_open_clip_weights(tmp_path, tiny_weights):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(tiny_weights.read_bytes()[:50_000])
    with pytest.raises(ModelSpecError, match=r"cannot read weights .*cut\.pt.*truncated or corrupt"):
        load_eval_model(f"open_clip:clipkit-tiny-ViT@{cut}")


def test_open_clip_weights_from_another_architecture(tmp_path):
    rn = tiny_open_clip_weights(tmp_path / "rn.pt", config="clipkit-tiny-RN")
    with pytest.raises(
        ModelSpecError, match=r"do not fit open_clip config 'clipkit-tiny-ViT'.*another architecture"
    ):
        load_eval_model(f"open_clip:clipkit-tiny-ViT@{rn}")


# ----------------------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module", params=["clip", "siglip"])
def hf_dir(request, tmp_path_factory):
    return request.param, tiny_hf_model(tmp_path_factory.mktemp(request.param), request.param)


def test_hf_clip_equals_transformers(hf_dir):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    kind, folder = hf_dir
    model = load_eval_model(f"hf-clip:{folder}")
    ref = AutoModel.from_pretrained(folder).eval()
    proc = AutoImageProcessor.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    pixels = proc(images=[photo(0), photo(1)], return_tensors="pt")["pixel_values"]
    assert torch.equal(torch.stack([model.image_transform()(photo(i)) for i in range(2)]), pixels)
    texts = ["a red cat", "a blue dog on a mat"]
    ids = tok(texts, padding="max_length", max_length=16, return_tensors="pt")["input_ids"]
    assert torch.equal(model.tokenize(texts), ids)

    def feats(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.inference_mode():
        torch.testing.assert_close(
            model.encode_image(image=pixels),
            F.normalize(feats(ref.get_image_features(pixel_values=pixels)), dim=-1),
        )
        got = model.encode_text(ids)
        torch.testing.assert_close(got, F.normalize(feats(ref.get_text_features(input_ids=ids)), dim=-1))
        if kind == "clip":  # padding after the end-of-text token cannot change CLIP's pooled output
            for i, t in enumerate(texts):
                short = tok([t], return_tensors="pt")
                want = F.normalize(feats(ref.get_text_features(**short)), dim=-1)[0]
                torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
    assert model.name == f"hf-clip:{folder.name}"
    classifier = build_classifier(model, ["red", "blue"], ["a {c} photo"])
    assert classifier.shape == (2, model.encode_text(ids[:1]).shape[1])


# ----------------------------------------------------------------------------- clipkit runs


def tiny_run(tmp_path, **overrides):
    over = {
        "model.vision.name": "open_clip:clipkit-tiny-ViT",
        "model.vision.image_size": 32,
        "model.vision.weights": "",
        "model.text.weights": "",
        "model.text.name": "open_clip:clipkit-tiny-ViT",
        "model.text.context_length": 16,
        "model.projection": "none",
        "model.embed_dim": 32,
        **overrides,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in over.items()])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    run = tmp_path / "run"
    path = ckpt.save(run, 10, {"model": model.state_dict(), "config": to_dict(cfg)})
    return run, path, model


def test_clipkit_run_folder_and_checkpoint(tmp_path):
    run, path, ref = tiny_run(tmp_path)
    for spec in (str(run), str(path)):
        model = load_eval_model(spec)
        assert model.pretrained == str(path)
        images = torch.randn(2, 3, 32, 32)
        with torch.inference_mode():
            torch.testing.assert_close(
                model.encode_image(image=images), ref.eval().encode_image(image=images)
            )


def test_truncated_clipkit_checkpoint(tmp_path):
    _, path, _ = tiny_run(tmp_path)
    path.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(ckpt.CheckpointError, match="is truncated"):  # the sidecar says so
        load_eval_model(str(path))
    path.with_suffix(".json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        load_eval_model(str(path))


def test_cached_tower_features_score_like_images(tmp_path):
    """The demo's path (tower run once, projections applied to cached features) = images."""
    from eval_helpers import wds_classification, wds_retrieval

    from clipkit.evaluation import evaluate_retrieval, evaluate_zeroshot, open_dataset
    from clipkit.evaluation.cached import tower_feature_dataset
    from clipkit.models.embed import ProjectedModel

    run, _, _ = tiny_run(tmp_path)
    model = load_eval_model(str(run))
    cls = open_dataset(str(wds_classification(tmp_path / "cls", n=20)))
    caps = open_dataset(str(wds_retrieval(tmp_path / "caps", n=12)))
    projected = ProjectedModel(model.model)
    for fn, ds in ((evaluate_zeroshot, cls), (evaluate_retrieval, caps)):
        want = fn(model, ds, batch_size=8)
        got = fn(projected, tower_feature_dataset(model.model, ds, batch_size=8), batch_size=8)
        assert got == pytest.approx(want, abs=1e-12)
