"""``clipkit export``: the demo architecture (EfficientNet-Lite0 + MiniLM, linear projections)
and an open_clip-tower model, loaded back by open_clip both ways, embed like clipkit to 1e-5."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipkit.cli.main import main
from clipkit.config import load_config, to_dict
from clipkit.models import build_model
from clipkit.models.export import ExportError, export_open_clip
from clipkit.training import checkpoint as ckpt

TEXTS = ["a grinning face", "the flag of  Japan", "a red apple on a table, photographed from above"]


def photos() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((90, 70), (64, 120))
    ]


def save_run(tmp_path, overrides: list[str], seed: int = 0):
    cfg = load_config("train/lit_emoji.yaml", overrides)
    torch.manual_seed(seed)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    ckpt.save(tmp_path / "run", 5, {"model": model.state_dict(), "config": to_dict(cfg)})
    return tmp_path / "run", model


def embeddings(encode_image, encode_text, preprocess, tokenize):
    with torch.inference_mode():
        images = torch.stack([preprocess(p) for p in photos()])
        return encode_image(images), encode_text(tokenize(TEXTS))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    run, model = save_run(tmp, ["model.vision.image_size=64"])
    return run, model, tmp


def test_demo_model_export_loads_in_open_clip(demo, capsys):
    run, model, tmp = demo
    out = tmp / "export"
    # (--no-check: this test loads the export itself, twice)
    assert (
        main(["export", "--model", str(run), "--out", str(out), "--name", "clipkit-demo", "--no-check"]) == 0
    )
    assert "exported" in capsys.readouterr().out
    want = embeddings(
        lambda x: model.encode_image(image=x, normalize=False),
        lambda t: model.encode_text(t, normalize=False),
        model.image_transform(False),
        model.tokenize,
    )
    # 1. The folder, as open_clip's local-dir: model.
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    got = embeddings(oc.eval().encode_image, oc.encode_text, preprocess, tok)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    # 2. By name, with the weights file as `pretrained` (what CLIP_benchmark does).
    open_clip.add_model_config(out / "clipkit-demo.json")
    oc2, _, preprocess2 = open_clip.create_model_and_transforms(
        "clipkit-demo",
        pretrained=str(out / "open_clip_model.safetensors"),
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
        image_interpolation="bicubic",
    )
    got2 = embeddings(
        oc2.eval().encode_image, oc2.encode_text, preprocess2, open_clip.get_tokenizer("clipkit-demo")
    )
    for g, w in zip(got2, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)
    assert float(oc2.logit_scale.detach()) == pytest.approx(3.0)


def test_open_clip_tower_model_exports_its_open_clip_weights(tmp_path):
    over = [
        "model.vision.name=open_clip:clipkit-tiny-ViT-customtext",
        "model.text.name=open_clip:clipkit-tiny-ViT-customtext",
    ]
    over += ["model.vision.weights=", "model.text.weights=", "model.projection=none", "model.embed_dim=32"]
    over += ["model.vision.image_size=32", "model.text.context_length=16", "model.init_logit_bias=-10"]
    run, model = save_run(tmp_path, over)
    info = export_open_clip(str(run), tmp_path / "out")
    assert info["max_abs_diff"] <= 1e-6
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'out'}")
    got = embeddings(
        oc.eval().encode_image,
        oc.encode_text,
        preprocess,
        open_clip.get_tokenizer(f"local-dir:{tmp_path / 'out'}"),
    )
    want = embeddings(
        lambda x: model.encode_image(image=x), model.encode_text, model.image_transform(False), model.tokenize
    )
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.nn.functional.normalize(g, dim=-1), w, atol=1e-5, rtol=0)
    assert float(oc.logit_bias.detach()) == -10.0


def test_mlp_projection_is_refused(tmp_path):
    run, _ = save_run(tmp_path, ["model.projection=mlp", "model.vision.image_size=64"])
    with pytest.raises(ExportError, match="projection 'mlp' has no open_clip equivalent"):
        export_open_clip(str(run), tmp_path / "out")


def test_grid_pooling_is_refused(tmp_path):
    run, _ = save_run(tmp_path, ["model.vision.pool_grid=2", "model.vision.image_size=64"])
    with pytest.raises(ExportError, match="pool_grid=2 has no open_clip equivalent"):
        export_open_clip(str(run), tmp_path / "out")
    assert not list((tmp_path / "out").glob("*"))  # refused before anything is written
