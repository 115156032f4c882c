"""``open_clip:<model config>`` towers: the image or text half of an open_clip model.

Both halves already project into the model's embedding width (``out_dim = embed_dim``), so
with ``projection: none`` a DualEncoder computes exactly ``model.encode_image`` /
``model.encode_text``. When both towers name the same config and weights, ``build_towers``
builds the open_clip model once and each tower takes its half (no duplicated weights).

Weights: ``""`` (random) or a local checkpoint file; nothing is downloaded. Configs whose
text tower or tokenizer come from the Hugging Face hub are refused up front. Tiny configs
for tests and smoke runs ship in ``open_clip_configs/`` (``clipkit-tiny-ViT``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
from open_clip.transformer import text_global_pool
from torch import Tensor, nn

from clipkit.config import TowerConfig
from clipkit.models.tower_base import TOWERS, Tower, group_names
from clipkit.registry import suggest

open_clip.add_model_config(Path(__file__).parent / "open_clip_configs")

VIT_GROUPS = {
    "stem": r"^(?:class_embedding|positional_embedding|conv1|ln_pre|patchnorm_pre_ln)",
    "blocks": r"^transformer\.resblocks\.(\d+)\.",
}  # unmatched (ln_post, proj, attn_pool) -> top layer
RESNET_GROUPS = {"stem": r"^(?:conv[123]|bn[123])\.", "blocks": r"^layer(\d+)\.(\d+)\."}  # top: attnpool
TEXT_GROUPS = {
    "embed": r"^(?:token_embedding|positional_embedding|cls_emb)",
    "blocks": r"^transformer\.resblocks\.(\d+)\.",
}  # top: ln_final, text_projection


def check_config(name: str) -> dict[str, Any]:
    if name.startswith(("hf-hub:", "local-dir:")):
        raise ValueError(f"open_clip:{name}: only built-in config names are supported (no hub schemas)")
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ValueError(f"unknown open_clip config '{name}';{suggest(name, open_clip.list_models())}")
    text = cfg.get("text_cfg", {})
    if text.get("hf_model_name") or text.get("hf_tokenizer_name"):
        raise ValueError(f"open_clip:{name} needs a Hugging Face hub model/tokenizer; unavailable offline")
    return cfg


def create_open_clip(
    name: str, weights: str, image_size: int | None, context_length: int | None
) -> nn.Module:
    """An open_clip model, randomly initialised or loaded from a local checkpoint file."""
    check_config(name)
    model = open_clip.create_model(
        name,
        pretrained=None,
        force_image_size=image_size,
        force_context_length=context_length,
        pretrained_image=False,
        pretrained_text=False,
    )
    if weights == "bundled":
        raise ValueError(f"open_clip:{name}: no bundled weights; use a local checkpoint file or '' (random)")
    if weights:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"open_clip:{name}: weights file '{weights}' not found")
        sd = open_clip.factory.load_state_dict(weights)
        pos = sd.get("positional_embedding", sd.get("text.positional_embedding"))
        if context_length is not None and pos is not None and pos.shape[0] != context_length:
            raise ValueError(
                f"checkpoint '{weights}' has a text context length of {pos.shape[0]}; "
                f"set context_length={pos.shape[0]} on the text tower"
            )
        open_clip.load_checkpoint(model, weights, strict=True)
    return model


def _shared_model(arch: str, cfg: TowerConfig, modality: str, shared: dict[str, Any] | None) -> nn.Module:
    if shared is not None and "open_clip_sizes" in shared:  # both towers of one model: build once
        if "open_clip_model" not in shared:
            image_size, context_length = shared["open_clip_sizes"]
            shared["open_clip_model"] = create_open_clip(arch, cfg.weights, image_size, context_length)
        return shared["open_clip_model"]
    if modality == "vision":
        return create_open_clip(arch, cfg.weights, cfg.image_size, None)
    return create_open_clip(arch, cfg.weights, None, cfg.context_length)


class ClipText(nn.Module):
    """The text half of an open_clip ``CLIP``; ``forward`` is ``CLIP.encode_text`` (unnormalised)."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection  # Parameter, Linear or None
        self.text_pool_type = clip.text_pool_type
        self.text_eos_id = getattr(clip, "text_eos_id", None)
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)

    def forward(self, text: Tensor) -> Tensor:
        # Same operations, in the same order, as open_clip.model.CLIP.encode_text.
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(cast_dtype)  # (B, L, width)
        x = x + self.positional_embedding.to(cast_dtype)
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        x = text_global_pool(x, text, self.text_pool_type, eos_token_id=self.text_eos_id)  # (B, width)
        if self.text_projection is not None:
            if isinstance(self.text_projection, nn.Linear):
                x = self.text_projection(x)
            else:
                x = x @ self.text_projection
        return x  # (B, embed_dim)


@TOWERS.register("open_clip")
class OpenClipTower(Tower):
    """``open_clip:<config>``: ``model.visual`` (vision) or the text encoder (text), both projected."""

    examples = (
        ("vision", {"name": "open_clip:clipkit-tiny-ViT", "image_size": 32}),
        ("vision", {"name": "open_clip:clipkit-tiny-RN", "image_size": 64}),
        ("text", {"name": "open_clip:clipkit-tiny-ViT", "context_length": 16}),
        ("text", {"name": "open_clip:clipkit-tiny-ViT-customtext", "context_length": 16}),
    )

    def __init__(self, arch: str, cfg: TowerConfig, modality: str, shared: dict[str, Any] | None = None):
        super().__init__(f"open_clip:{arch}", modality)
        clip = _shared_model(arch, cfg, modality, shared)
        self.out_dim = int(open_clip.get_model_config(arch)["embed_dim"])
        if modality == "vision":
            self.model = clip.visual
            self.preprocess = dict(clip.visual.preprocess_cfg)
            self.augment = cfg.augment
            self.deterministic_transform = not cfg.augment
            self._fingerprint_extra = f"preprocess={sorted(self.preprocess.items())}"
        else:
            self.model = clip.text if hasattr(clip, "text") else ClipText(clip)
            context_length = int(
                clip.context_length if hasattr(clip, "context_length") else cfg.context_length
            )
            self.tokenizer = open_clip.get_tokenizer(arch, context_length=context_length)
            self._fingerprint_extra = f"L={context_length}|{type(self.tokenizer).__name__}"

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)  # images (B, 3, H, W) or tokens (B, L) -> (B, embed_dim)

    def transform(self, train: bool) -> Any:
        if self.modality != "vision":
            return super().transform(train)
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**self.preprocess), is_train=train and self.augment)

    def tokenize(self, texts: list[str]) -> Tensor:
        if self.modality != "text":
            return super().tokenize(texts)
        return self.tokenizer(list(texts)).long()

    def param_groups(self) -> list[list[str]]:
        names = [n for n, _ in self.model.named_parameters()]
        if self.modality == "text":
            return group_names(names, TEXT_GROUPS)
        kind = type(self.model).__name__
        if kind == "VisionTransformer":
            return group_names(names, VIT_GROUPS)
        if kind == "ModifiedResNet":
            return group_names(names, RESNET_GROUPS)
        if kind == "TimmModel" and hasattr(self.model.trunk, "group_matcher"):
            trunk = [n.removeprefix("trunk.") for n in names if n.startswith("trunk.")]
            groups = [["trunk." + n for n in g] for g in group_names(trunk, self.model.trunk.group_matcher())]
            head = [n for n in names if not n.startswith("trunk.")]
            return groups + ([head] if head else [])
        order = list(dict.fromkeys(n.split(".")[0] for n in names))  # one layer per top-level child
        return group_names(names, lambda n: order.index(n.split(".")[0]))
