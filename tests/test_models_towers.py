"""The tower contract, checked for every registered tower prefix via its ``examples``."""

import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from clipkit.config import TowerConfig
from clipkit.models import TOWERS, build_tower

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXAMPLES = [
    pytest.param(modality, kwargs, id=f"{kwargs['name']}-{modality}")
    for prefix in TOWERS.names()
    for modality, kwargs in TOWERS.get(prefix).examples
]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_prefix_has_examples():
    for prefix in TOWERS.names():
        examples = TOWERS.get(prefix).examples
        assert examples, f"tower '{prefix}' defines no examples; the contract tests cannot cover it"
        assert all(kw["name"].startswith(prefix + ":") for _, kw in examples)


def sample_input(tower, cfg: TowerConfig, batch: int = 2) -> torch.Tensor:
    if tower.modality == "vision":
        rng = np.random.default_rng(0)
        pics = [
            Image.fromarray(rng.integers(0, 255, (40 + 9 * i, 50, 3), dtype=np.uint8)) for i in range(batch)
        ]
        tf = tower.transform(train=False)
        x = torch.stack([tf(p) for p in pics])
        assert x.shape == (batch, 3, cfg.image_size, cfg.image_size) and x.dtype == torch.float32
        if tower.deterministic_transform:
            torch.testing.assert_close(tower.transform(train=True)(pics[0]), x[0], atol=0, rtol=0)
        return x
    tokens = tower.tokenize(["a photo of a cat", "an emoji of a smiling face with sunglasses"][:batch])
    assert tokens.dtype == torch.long and tokens.shape == (batch, cfg.context_length)
    return tokens


@pytest.mark.parametrize("modality,kwargs", EXAMPLES)
def test_tower_contract(modality, kwargs):
    cfg = TowerConfig(**kwargs)
    tower = build_tower(cfg, modality).eval()
    assert tower.modality == modality and tower.spec == cfg.name
    x = sample_input(tower, cfg)
    with torch.no_grad():
        out = tower(x)
    assert out.shape == (2, tower.out_dim) and torch.isfinite(out).all()

    # layers(): bottom-to-top, every parameter in exactly one layer.
    layers = tower.layers()
    assert len(layers) >= 2
    ids = [id(p) for layer in layers for p in layer.parameters()]
    assert len(ids) == len(set(ids)) == len(list(tower.parameters()))
    assert tower.state_dict().keys() == build_tower(cfg, modality).state_dict().keys()  # views add no keys

    # fingerprint(): 16 hex chars, stable, sensitive to any weight.
    fp = tower.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", fp) and tower.fingerprint() == fp
    with torch.no_grad():
        next(iter(layers[-1].parameters())).view(-1)[0] += 1e-3
    assert tower.fingerprint() != fp


@pytest.mark.parametrize("modality,kwargs", EXAMPLES)
def test_tower_lock(modality, kwargs):
    cfg = TowerConfig(**kwargs)
    tower = build_tower(TowerConfig(**{**kwargs, "locked": True, "unlocked_layers": 1}), modality)
    top = {id(p) for p in tower.layers()[-1].parameters()}
    assert top and all(p.requires_grad == (id(p) in top) for p in tower.parameters())
    tower.train()
    locked_modules = [m for layer in tower.layers()[:-1] for m in layer.modules() if m is not layer]
    assert not any(m.training for m in locked_modules)

    tower.lock(0)  # fully locked: eval mode inside a training model, deterministic output
    tower.train()
    assert not any(p.requires_grad for p in tower.parameters()) and not tower.training
    x = sample_input(tower, cfg)
    assert torch.equal(tower(x), tower(x))
    with pytest.raises(ValueError, match="layers"):
        tower.lock(len(tower.layers()) + 1)


def test_timm_weights_from_files_match_bundled(tmp_path):
    from safetensors.torch import save_file

    from clipkit.models.towers_timm import bundled_effnet_lite0_state_dict

    bundled = build_tower(TowerConfig(name="timm:tf_efficientnet_lite0", weights="bundled"), "vision")
    sd = {k: v.contiguous() for k, v in bundled.model.state_dict().items()}
    save_file(sd, tmp_path / "w.safetensors")
    torch.save({"state_dict": sd}, tmp_path / "w.pt")
    torch.save(bundled_effnet_lite0_state_dict(), tmp_path / "package_format.pth")
    for name in ("w.safetensors", "w.pt", "package_format.pth"):
        cfg = TowerConfig(name="timm:tf_efficientnet_lite0", weights=str(tmp_path / name))
        assert build_tower(cfg, "vision").fingerprint() == bundled.fingerprint(), name
    random = build_tower(TowerConfig(name="timm:tf_efficientnet_lite0"), "vision")
    assert random.fingerprint() != bundled.fingerprint()
    other_size = build_tower(
        TowerConfig(name="timm:tf_efficientnet_lite0", weights="bundled", image_size=160), "vision"
    )
    assert other_size.fingerprint() != bundled.fingerprint()  # the transform is part of the cache key


def test_hf_weights_from_file_match_bundled(tmp_path):
    cfg = TowerConfig(name="hf:minilm", weights="bundled", context_length=8)
    bundled = build_tower(cfg, "text")
    torch.save(bundled.model.state_dict(), tmp_path / "minilm.pt")
    from_file = build_tower(
        TowerConfig(name="hf:minilm", weights=str(tmp_path / "minilm.pt"), context_length=8), "text"
    )
    assert from_file.fingerprint() == bundled.fingerprint()
    torch.save({"encoder.layer.0.typo.weight": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not fit"):
        build_tower(TowerConfig(name="hf:minilm", weights=str(tmp_path / "bad.pt")), "text")


@pytest.mark.parametrize(
    "name,modality,kw,error,match",
    [
        ("efficientnet", "vision", {}, ValueError, "<prefix>:<arch>"),
        ("tim:resnet18", "vision", {}, KeyError, "did you mean 'timm'"),
        ("timm:resnet_18", "vision", {}, ValueError, "did you mean 'resnet18'"),
        ("timm:resnet18", "text", {}, ValueError, "image tower"),
        ("timm:resnet18", "vision", {"weights": "bundled"}, ValueError, "no bundled weights"),
        ("timm:resnet18", "vision", {"weights": "/nonexistent/w.pt"}, FileNotFoundError, "not found"),
        ("timm:resnet18", "vision", {"unlocked_layers": 2}, ValueError, "only applies with locked=true"),
        ("hf:/nonexistent/dir", "text", {}, FileNotFoundError, "minilm"),
        ("hf:minilm", "vision", {}, ValueError, "text tower"),
        ("hf:minilm", "text", {"context_length": 1000}, ValueError, "max positions"),
        ("open_clip:ViT-B-33", "vision", {}, ValueError, "did you mean 'ViT-B-32'"),
        ("open_clip:roberta-ViT-B-32", "text", {}, ValueError, "offline"),
        ("open_clip:clipkit-tiny-ViT", "text", {"weights": "bundled"}, ValueError, "no bundled weights"),
    ],
)
def test_build_errors_name_the_problem(name, modality, kw, error, match):
    with pytest.raises(error, match=re.escape(match)):
        build_tower(TowerConfig(name=name, **kw), modality)


@pytest.mark.parametrize("config", ["ViT-B-32", "RN50"])
def test_open_clip_tokenizers_work_offline(config):
    import open_clip

    tokens = open_clip.get_tokenizer(config, context_length=16)(["a photo of a cat"])
    assert tokens.shape == (1, 16) and tokens[0, 0] == 49406  # <start_of_text>


def test_transforms_pickle_for_loader_workers():
    import pickle

    for modality, kwargs in EXAMPLES_PICKLE:
        tower = build_tower(TowerConfig(**kwargs), modality)
        obj = tower.transform(False) if modality == "vision" else tower.tokenizer
        pickle.loads(pickle.dumps(obj))


EXAMPLES_PICKLE = [
    ("vision", {"name": "timm:resnet18", "image_size": 32}),
    ("vision", {"name": "open_clip:clipkit-tiny-ViT", "image_size": 32}),
    ("text", {"name": "hf:minilm", "weights": "bundled", "context_length": 8}),
    ("text", {"name": "open_clip:clipkit-tiny-ViT", "context_length": 16}),
]
