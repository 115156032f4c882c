"""DualEncoder: open_clip parity, temperature / bias, cached-feature path, projections."""

import math
import os

import open_clip
import pytest
import torch
from torch import nn

from clipkit.config import ModelConfig, TowerConfig
from clipkit.models import build_model, build_projection

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = TowerConfig(name="open_clip:clipkit-tiny-ViT", image_size=32, context_length=16)
TINY_MODEL = ModelConfig(vision=TINY, text=TINY, embed_dim=32, projection="linear")


pytestmark = pytest.mark.usefixtures("one_thread")


def batch(model, n: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    size = model.vision.transform(False).transforms[1].size  # CenterCrop size
    size = size[0] if isinstance(size, (tuple, list)) else size
    texts = ["a photo of a cat", "a diagram", "two dogs playing in the snow"][:n]
    return {"image": torch.randn(n, 3, size, size, generator=g), "text": model.tokenize(texts)}


@pytest.mark.parametrize(
    "config,image_size",
    [("clipkit-tiny-ViT", 32), ("clipkit-tiny-RN", 64), ("clipkit-tiny-ViT-customtext", 32)],
)
def test_projection_none_reproduces_open_clip(tmp_path, config, image_size):
    ref = open_clip.create_model(
        config, pretrained=None, force_image_size=image_size, force_context_length=16
    )
    torch.save(ref.state_dict(), tmp_path / "ckpt.pt")
    tower = TowerConfig(name=f"open_clip:{config}", weights=str(tmp_path / "ckpt.pt"), image_size=image_size)
    tower = TowerConfig(**{**tower.__dict__, "context_length": 16})
    model = build_model(ModelConfig(vision=tower, text=tower, embed_dim=32, projection="none")).eval()
    ref.eval()
    b = batch(model)
    with torch.no_grad():
        out = model(b)
        torch.testing.assert_close(
            out["image_emb"], ref.encode_image(b["image"], normalize=True), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(
            out["text_emb"], ref.encode_text(b["text"], normalize=True), atol=1e-6, rtol=0
        )
    assert torch.equal(
        b["text"],
        open_clip.get_tokenizer(config, context_length=16)(
            ["a photo of a cat", "a diagram", "two dogs playing in the snow"]
        ),
    )
    # One shared open_clip model: each half once, no parameter in both towers.
    v, t = {id(p) for p in model.vision.parameters()}, {id(p) for p in model.text.parameters()}
    assert not v & t
    n_ref = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("logit_"))
    assert (
        sum(p.numel() for p in model.vision.parameters()) + sum(p.numel() for p in model.text.parameters())
        == n_ref
    )


def test_logit_scale_init_clamp_and_bias():
    model = build_model(TINY_MODEL)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    out = model(batch(model))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert "logit_bias" not in out and model.logit_bias is None
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model(batch(model))["logit_scale"].item() == pytest.approx(100.0, rel=1e-6)  # clamped at ln 100

    siglip = build_model(
        ModelConfig(**{**TINY_MODEL.__dict__, "init_logit_scale": math.log(10), "init_logit_bias": -10.0})
    )
    out = siglip(batch(siglip))
    assert out["logit_scale"].item() == pytest.approx(10.0, rel=1e-6)
    assert out["logit_bias"].item() == -10.0 and isinstance(siglip.logit_bias, nn.Parameter)


def test_forward_contract_and_submodule_names():
    model = build_model(TINY_MODEL)
    names = {n for n, _ in model.named_children()}
    assert {"vision", "text", "vision_proj", "text_proj"} <= names
    assert {n for n, _ in model.named_parameters(recurse=False)} == {"logit_scale"}
    out = model(batch(model))
    assert set(out) == {"image_emb", "text_emb", "logit_scale"}
    for k in ("image_emb", "text_emb"):
        assert out[k].shape == (3, 32)
        torch.testing.assert_close(out[k].norm(dim=-1), torch.ones(3))
    assert out["logit_scale"].ndim == 0


def test_cached_features_give_the_same_embeddings():
    cfg = ModelConfig(**{**TINY_MODEL.__dict__, "vision": TowerConfig(**{**TINY.__dict__, "locked": True})})
    model = build_model(cfg).train()
    b = batch(model)
    feats = model.tower_features(b["image"]).detach()
    assert feats.shape == (3, model.vision.out_dim)
    cached = model({"image_features": feats, "text": b["text"]})
    assert torch.equal(cached["image_emb"], model(b)["image_emb"])
    assert model.image_features_cacheable


def test_cached_features_refused_for_a_trainable_tower():
    model = build_model(TINY_MODEL).train()
    b = batch(model)
    feats = model.tower_features(b["image"]).detach()
    assert not model.image_features_cacheable
    with pytest.raises(ValueError, match="trainable"):
        model({"image_features": feats, "text": b["text"]})
    with pytest.raises(ValueError, match="exactly one"):
        model.encode_image(image=b["image"], image_features=feats)
    with pytest.raises(ValueError, match="exactly one"):
        model.encode_image()
    model.eval()  # evaluation may embed cached features of the current weights
    model.encode_image(image_features=feats)


def test_projections():
    lin = build_projection("linear", 8, 4)
    assert isinstance(lin, nn.Linear) and lin.bias is None and lin.weight.shape == (4, 8)
    mlp = build_projection("mlp", 8, 4)
    assert [type(m) for m in mlp] == [nn.Linear, nn.GELU, nn.Linear] and mlp(torch.randn(2, 8)).shape == (
        2,
        4,
    )
    assert isinstance(build_projection("none", 4, 4), nn.Identity)
    with pytest.raises(ValueError, match=r"embed_dim=8 or use model.projection=linear"):
        build_projection("none", 8, 4, "vision tower timm:x")
    with pytest.raises(KeyError, match="did you mean 'linear'"):
        build_projection("lienar", 8, 4)


def test_projection_none_with_a_wider_tower_says_what_to_change():
    vision = TowerConfig(name="timm:resnet18", image_size=32)
    with pytest.raises(ValueError, match=r"vision tower timm:resnet18.*set model.embed_dim=512"):
        build_model(ModelConfig(vision=vision, text=TINY, embed_dim=32, projection="none"))


def test_lit_model_param_groups_and_locked_state():
    vision = TowerConfig(name="timm:tf_efficientnet_lite0", weights="bundled", locked=True, image_size=64)
    model = build_model(ModelConfig(vision=vision, text=TINY, embed_dim=16))
    state = model.locked_state()
    assert (
        state["vision"]["locked"]
        and state["vision"]["trainable_params"] == 0
        and state["vision"]["layers"] == 18
    )
    assert state["text"]["trainable_params"] == state["text"]["params"] > 0
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"text", "vision_proj", "text_proj", "logit_scale"}
    assert model.image_transform(train=True) is not None and model.vision.deterministic_transform
