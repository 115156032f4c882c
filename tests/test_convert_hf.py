"""hf_to_open_clip: a Hugging Face CLIP / SigLIP folder, converted and loaded by open_clip from a
relocated copy, tokenizes, preprocesses and embeds exactly as transformers does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_helpers import tiny_clip_tokenizer
from PIL import Image

from clipkit.errors import ClipkitError
from clipkit.models.convert_hf import HFConversionError, hf_to_open_clip, save_hf_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# "zebra" is an added token whose id is above end-of-text: pooling at argmax(ids) instead of at
# the first end-of-text token (or the reverse) picks another position and fails the text check.
TEXTS = ["a red zebra", "  a blue   dog on a red mat ", "red " * 20, ""]
LENGTH = 16


def tokenizer():
    tok = tiny_clip_tokenizer()
    tok.add_tokens(["zebra"])
    assert tok.convert_tokens_to_ids("zebra") > tok.eos_token_id
    return tok


def text_config(tok, **extra) -> dict:
    ids = {
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "bos_token_id": tok.bos_token_id,
    }
    size = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    return {"vocab_size": len(tok), "max_position_embeddings": LENGTH, **size, **ids, **extra}


def saved_and_loaded(folder: Path, model, tok, proc) -> tuple:
    """Through ``save_pretrained`` and the Auto classes, as ``hf-clip:<dir>`` loads a folder."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    for part in (model, tok, proc):
        part.save_pretrained(folder)
    loaded = AutoModel.from_pretrained(folder).eval()
    return loaded, AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def hf_clip(folder: Path, act: str, legacy_eos: bool) -> tuple:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = tokenizer()
    text = text_config(tok, hidden_act=act, **({"eos_token_id": 2} if legacy_eos else {}))
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 3}
    vision.update(image_size=32, patch_size=8, hidden_act=act, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    with torch.no_grad():  # HF initialises LayerNorms to (1, 0): make a swapped LN visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return saved_and_loaded(folder, model, tok, proc)


def hf_siglip() -> tuple:
    """Text tower tiny; image tower shaped as timm's ``vit_base_patch32_siglip_256`` (open_clip
    builds SigLIP image towers by registered timm name, so smaller ones have no open_clip form).
    Kept in memory: writing and reading its 350 MB costs seconds and tests nothing more."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    tok = tokenizer()
    text = text_config(tok, projection_size=768)
    vision = {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    }
    vision.update(image_size=256, patch_size=32)
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():
        model.logit_scale.fill_(2.3)
        model.logit_bias.fill_(-7.5)
        for name, p in model.named_parameters():
            if "norm" in name or "probe" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval(), SiglipImageProcessor(size={"height": 256, "width": 256}), tok


def export(hf: tuple, out: Path) -> dict:
    """The open_clip ``local-dir:`` layout, written the way ``clipkit export`` writes it; returns
    the model config."""
    from safetensors.torch import save_file

    model, proc, tok = hf
    model_cfg, preprocess_cfg, state = hf_to_open_clip(model, proc)
    out.mkdir()
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=1))
    save_file(state, out / "open_clip_model.safetensors")
    save_hf_tokenizer(tok, out)
    return model_cfg


def relocated(out: Path, tmp_path: Path) -> Path:
    """The export moved to another folder (a copy with the original deleted, without copying
    hundreds of megabytes): nothing may still point at where it was written."""
    text = (out / "open_clip_config.json").read_text()
    assert str(tmp_path) not in text and '"/' not in text  # no path, absolute or otherwise
    (tmp_path / "elsewhere").mkdir()
    moved = Path(shutil.move(out, tmp_path / "elsewhere" / "copy"))
    assert not out.exists()
    return moved


def photos(size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    ramp = np.zeros((size * 3 // 2, size * 2, 3), dtype=np.uint8)  # not square: crop != squash
    ramp[..., 0] = np.linspace(0, 255, size * 2)[None, :]
    ramp[..., 1] = np.linspace(0, 255, size * 3 // 2)[:, None]
    return [Image.fromarray(noise), Image.fromarray(ramp)]


def check_parity(hf: tuple, oc_dir: Path, image_size: int) -> None:
    import open_clip

    ref, proc, tok = hf
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{oc_dir}")
    model.eval()
    oc_tok = open_clip.get_tokenizer(f"local-dir:{oc_dir}")

    ids = tok(TEXTS, padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt")[
        "input_ids"
    ]
    assert torch.equal(oc_tok(TEXTS), ids)
    pixels = proc(images=photos(image_size), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(
        torch.stack([preprocess(p) for p in photos(image_size)]), pixels, atol=1e-4, rtol=0
    )

    def feats(out):
        return F.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)

    images = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want_img, want_txt = (
            feats(ref.get_image_features(pixel_values=images)),
            feats(ref.get_text_features(input_ids=ids)),
        )
        torch.testing.assert_close(model.encode_image(images, normalize=True), want_img, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(ids, normalize=True), want_txt, atol=1e-5, rtol=0)
        assert float(model.logit_scale) == pytest.approx(float(ref.logit_scale))
        if hasattr(ref, "logit_bias"):
            assert float(model.logit_bias) == pytest.approx(float(ref.logit_bias))


@pytest.mark.parametrize(
    "act, legacy_eos", [("quick_gelu", False), ("gelu", True), ("gelu_pytorch_tanh", False)]
)
def test_clip_exports_exactly(tmp_path, act, legacy_eos):
    hf = hf_clip(tmp_path / "hf", act, legacy_eos)
    cfg = export(hf, tmp_path / "export")
    assert cfg["quick_gelu"] == (act == "quick_gelu")
    assert cfg["text_cfg"]["pool_type"] == ("argmax" if legacy_eos else "eos")
    check_parity(hf, relocated(tmp_path / "export", tmp_path), image_size=32)


def test_siglip_exports_exactly(tmp_path):
    hf = hf_siglip()
    cfg = export(hf, tmp_path / "export")
    assert cfg["vision_cfg"]["timm_model_name"] == "vit_base_patch32_siglip_256"
    assert cfg["init_logit_bias"] == pytest.approx(-7.5)
    check_parity(hf, relocated(tmp_path / "export", tmp_path), image_size=256)


def siglip_on_meta(**vision):
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    text = text_config(tokenizer(), projection_size=vision["hidden_size"])
    with torch.device("meta"):
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    size = vision["image_size"]
    return model, SiglipImageProcessor(size={"height": size, "width": size})


def test_siglip_without_a_matching_timm_tower_is_refused():
    # google/siglip-base-patch16-224's shapes: timm's vit_base_patch16_siglip_224 has them but
    # computes exact GELU where SigLIP uses the tanh approximation.
    base = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
    with pytest.raises(
        HFConversionError, match=r"vit_base_patch16_siglip_224: activation GELU.*gelu_pytorch_tanh"
    ):
        hf_to_open_clip(*siglip_on_meta(**base, image_size=224, patch_size=16))
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    with pytest.raises(HFConversionError, match=r"none of timm's SigLIP ViTs matches.*hf-clip:"):
        hf_to_open_clip(*siglip_on_meta(**tiny, image_size=32, patch_size=8))


def test_other_models_are_refused():
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        bert = BertModel(
            BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        )
    with pytest.raises(HFConversionError, match="BertModel has no open_clip form.*CLIPModel and SiglipModel"):
        hf_to_open_clip(bert, None)
    assert issubclass(HFConversionError, ClipkitError)


def test_unsupported_preprocessing_is_refused(tmp_path):
    from transformers import CLIPImageProcessor

    model = hf_clip(tmp_path / "hf", "quick_gelu", False)[0]
    crop = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    with pytest.raises(HFConversionError, match="resizes to"):
        hf_to_open_clip(model, crop)
    nearest = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=0
    )
    with pytest.raises(HFConversionError, match="bilinear, bicubic"):
        hf_to_open_clip(model, nearest)
