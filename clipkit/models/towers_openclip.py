"""``open_clip:<model config>`` towers: the image or text half of an open_clip model.

Both halves already project into the model's embedding width (``out_dim = embed_dim``), so
with ``projection: none`` a DualEncoder computes exactly ``model.encode_image`` /
``model.encode_text``. When both towers name the same config and weights, ``build_towers``
builds the open_clip model once and each tower takes its half (no duplicated weights).

``<model config>`` is a built-in or clipkit config name, a model-config ``.json`` file, or
``local-dir:<folder>`` (``resolve_config``). Weights: ``""`` (random), a local checkpoint file,
or ``bundled`` for a ``local-dir:`` folder's own weights; nothing is downloaded. A config with a
Hugging Face text model or tokenizer (SigLIP, the multilingual ones) is built when each is a
local folder (``hf_model_name`` / ``hf_tokenizer_name`` pointing at one, or a ``local-dir:``
folder holding its tokenizer), and refused up front, naming it, otherwise. Tiny configs for
tests and smoke runs ship in ``open_clip_configs/`` (``clipkit-tiny-ViT``, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.factory import _find_checkpoint_in_dir as find_checkpoint
from open_clip.transformer import text_global_pool
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from clipkit.config import TowerConfig
from clipkit.data.augment import augmented_transform
from clipkit.models.local_dir import open_clip_kwargs
from clipkit.models.pooled_block import vit_pooled_forward, vit_pooled_ok
from clipkit.models.text_padding import CausalText, causal_text_forward, causal_text_spec
from clipkit.models.tower_base import (
    TOWERS,
    NoSplit,
    Step,
    Tower,
    TowerSplit,
    group_names,
    set_hf_grad_checkpointing,
    set_timm_grad_checkpointing,
    split_steps,
)
from clipkit.models.towers_hf_clip import block_list_name, blocks_in_order

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


HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")


def resolve_config(arch: str) -> tuple[str, dict[str, Any]]:
    """(the name open_clip knows the model by, its model config) for ``arch``.

    ``arch`` is a built-in or clipkit config name (``ViT-B-32``, ``clipkit-tiny-ViT``), a
    model-config ``.json`` file (registered under its stem, as ``open_clip:<file>`` specs are) or
    ``local-dir:<folder>`` (``open_clip_config.json`` + weights + tokenizer, what ``clipkit
    export`` writes). The hub (``hf-hub:``) is refused: nothing is downloaded.
    """
    from clipkit.models.specs import _model_cfg, _open_clip_name

    if arch.startswith("hf-hub:"):
        raise ValueError(
            f"open_clip:{arch}: hub models are not read (nothing is downloaded); give a built-in config "
            "name, a model-config .json file or local-dir:<folder>"
        )
    name = _open_clip_name(arch)
    cfg = _model_cfg(name)
    if not cfg:
        raise ValueError(f"open_clip:{arch}: no model config found")
    check_offline(arch, name, cfg)
    return name, cfg


def check_offline(arch: str, name: str, cfg: dict[str, Any]) -> None:
    """Every Hugging Face model or tokenizer the config names must be a local folder.

    open_clip would fetch ``text_cfg.hf_model_name`` / ``hf_tokenizer_name`` from the hub;
    clipkit works offline, so each must be a folder (a ``local-dir:`` model reads its tokenizer
    from its own folder, whatever ``hf_tokenizer_name`` says).
    """
    text = cfg.get("text_cfg", {})
    ref = text.get("hf_model_name")
    if ref and not (Path(ref) / "config.json").is_file():
        raise ValueError(
            f"open_clip:{arch} needs the Hugging Face text model '{ref}' (text_cfg.hf_model_name), which is "
            "not a local folder with a config.json; clipkit works offline and downloads nothing: save it "
            "once (AutoModel.from_pretrained(...).save_pretrained(dir)) and point hf_model_name at that "
            "folder in a model-config .json"
        )
    if not text.get("hf_tokenizer_name"):
        return
    local = name.startswith("local-dir:")
    folder = Path(name.removeprefix("local-dir:")) if local else Path(text["hf_tokenizer_name"])
    if any((folder / f).is_file() for f in HF_TOKENIZER_FILES):
        return
    what = (
        f"its Hugging Face tokenizer in {folder} (text_cfg.hf_tokenizer_name is set), which holds none"
        if local
        else f"the Hugging Face tokenizer '{folder}' (text_cfg.hf_tokenizer_name), which is not a local "
        "folder holding a tokenizer"
    )
    raise ValueError(
        f"open_clip:{arch} needs {what}; clipkit works offline and downloads nothing: save the tokenizer "
        "once (AutoTokenizer.from_pretrained(...).save_pretrained(dir)) and set hf_tokenizer_name to that "
        "folder in a model-config .json (or use a local-dir: export, which holds its tokenizer)"
    )


def create_open_clip(
    arch: str, weights: str, image_size: int | None, context_length: int | None
) -> tuple[nn.Module, str, dict[str, Any]]:
    """(open_clip model, its open_clip name, its model config): random, from a local checkpoint
    file, or (``local-dir:`` with ``weights="bundled"``) with the folder's own weights."""
    name, cfg = resolve_config(arch)
    local = name.startswith("local-dir:")
    if weights == "bundled" and not local:
        raise ValueError(f"open_clip:{arch}: no bundled weights; use a local checkpoint file or '' (random)")
    if weights not in ("", "bundled") and local:
        raise ValueError(
            f"open_clip:{arch}: a local-dir: model carries its own weights; weights=bundled loads them, "
            "'' is a random init"
        )
    if local and weights == "bundled" and find_checkpoint(Path(name.removeprefix("local-dir:"))) is None:
        raise FileNotFoundError(
            f"open_clip:{arch}: the folder holds no weights file; weights='' is a random init"
        )
    want = cfg.get("text_cfg", {}).get("context_length", 77)
    if local and weights == "bundled" and context_length is not None and context_length != want:
        raise ValueError(f"open_clip:{arch} was trained with context_length={want}; set it on the text tower")
    model = open_clip.create_model(
        name,
        pretrained=None,
        load_weights=weights == "bundled",  # local-dir: only (checked above)
        force_image_size=image_size,
        force_context_length=context_length,
        pretrained_image=False,
        pretrained_text=False,
        **open_clip_kwargs(name, context_length),  # a moved export: its text model config where it is now
    )
    if weights and not local:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"open_clip:{arch}: weights file '{weights}' not found")
        sd = open_clip.factory.load_state_dict(weights)
        pos = sd.get("positional_embedding", sd.get("text.positional_embedding"))
        if context_length is not None and pos is not None and pos.shape[0] != context_length:
            raise ValueError(
                f"checkpoint '{weights}' has a text context length of {pos.shape[0]}; "
                f"set context_length={pos.shape[0]} on the text tower"
            )
        open_clip.load_checkpoint(model, weights, strict=True)
    return model, name, cfg


def _shared_model(
    arch: str, cfg: TowerConfig, modality: str, shared: dict[str, Any] | None
) -> tuple[nn.Module, str, dict[str, Any]]:
    if shared is not None and "open_clip_sizes" in shared:  # both towers of one model: build once
        if "open_clip_model" not in shared:
            image_size, context_length = shared["open_clip_sizes"]
            shared["open_clip_model"] = create_open_clip(arch, cfg.weights, image_size, context_length)
        return shared["open_clip_model"]
    if modality == "vision":
        return create_open_clip(arch, cfg.weights, cfg.image_size, None)
    return create_open_clip(arch, cfg.weights, None, cfg.context_length)


class ClipText(nn.Module):
    """The text half of an open_clip ``CLIP``; ``forward`` is ``CLIP.encode_text`` (unnormalised),
    cut to the batch's longest caption when the mask is causal (``clipkit.models.text_padding``)."""

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
        self.causal = causal_text_spec(self)  # None: every column matters (bidirectional, last-token pool)

    def forward(self, text: Tensor) -> Tensor:
        if self.causal is not None:
            return causal_text_forward(self, text, self.causal)
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
        clip, name, model_cfg = _shared_model(arch, cfg, modality, shared)
        self.causal_text: CausalText | None = None
        self.out_dim = int(model_cfg["embed_dim"])
        if modality == "vision":
            self.model = clip.visual
            # The last block at the class token only (clipkit.models.pooled_block); False: open_clip's forward
            self.pooled_last_block = vit_pooled_ok(self.model)
            self.preprocess = dict(clip.visual.preprocess_cfg)
            self.augment = cfg.augment
            self.deterministic_transform, self.augmentation = not cfg.augment, cfg.augmentation
            self._fingerprint_extra = f"preprocess={sorted(self.preprocess.items())}"
        else:
            self.model = clip.text if hasattr(clip, "text") else ClipText(clip)
            # open_clip's TextTransformer (custom-text configs): its forward, cut to the longest caption
            self.causal_text = causal_text_spec(self.model) if hasattr(clip, "text") else None
            # An HF text model reports its maximum positions; the tokenizer pads to the config's length.
            hf_text = type(self.model).__name__ == "HFTextEncoder"
            own = clip.context_length if hasattr(clip, "context_length") and not hf_text else None
            context_length = int(own or cfg.context_length)
            self.tokenizer = open_clip.get_tokenizer(name, context_length=context_length)  # local (checked)
            self._fingerprint_extra = f"L={context_length}|{type(self.tokenizer).__name__}"

    def forward(self, x: Tensor) -> Tensor:
        if self.causal_text is not None:  # tokens (B, L), up to the last pooled one
            return causal_text_forward(self.model, x, self.causal_text)
        if self.modality == "vision" and self.pooled_last_block:
            return vit_pooled_forward(self.model, x)  # images (B, 3, H, W) -> (B, embed_dim)
        return self.model(x)  # images (B, 3, H, W) or tokens (B, L) -> (B, embed_dim)

    def transform(self, train: bool) -> Any:
        if self.modality != "vision":
            return super().transform(train)
        from open_clip.transform import PreprocessCfg, image_transform_v2

        pre = PreprocessCfg(**self.preprocess)
        if train and self.augment:  # open_clip's train crop (bicubic) and more, per model.vision.augmentation
            return augmented_transform(pre.size, tuple(pre.mean), tuple(pre.std), self.augmentation)
        return image_transform_v2(pre, is_train=False)

    def tokenize(self, texts: list[str]) -> Tensor:
        if self.modality != "text":
            return super().tokenize(texts)
        return self.tokenizer(list(texts)).long()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # open_clip's own set_grad_checkpointing silently does nothing for a ModifiedResNet and
        # for a timm trunk that refuses; each backbone kind is switched here instead.
        m, inner = self.model, getattr(self.model, "transformer", None)
        if type(m).__name__ == "TimmModel":  # timm trunk (+ open_clip head)
            set_timm_grad_checkpointing(m.trunk, self.spec, self.modality, enable)
        elif hasattr(inner, "supports_gradient_checkpointing"):  # HFTextEncoder: a Hugging Face model
            set_hf_grad_checkpointing(inner, self.spec, self.modality, enable)
        elif hasattr(inner, "grad_checkpointing"):  # ViT, text transformer: open_clip Transformer
            inner.grad_checkpointing = enable
        else:
            super().set_grad_checkpointing(enable)

    def split_at(self, unlocked_layers: int) -> TowerSplit:
        if self.modality != "vision" or type(self.model).__name__ != "VisionTransformer":
            raise NoSplit(
                f"{self.modality} tower {self.spec} ({type(self.model).__name__}): clipkit splits the "
                "forward of open_clip ViT image towers only"
            )
        return split_steps(self, vit_steps(self.model), unlocked_layers)

    def param_groups(self) -> list[list[str]]:
        names = [n for n, _ in self.model.named_parameters()]
        if self.modality == "text" and type(self.model).__name__ == "HFTextEncoder":
            # transformer.embeddings | transformer.encoder.layer.<i> ... | pooler, proj
            return blocks_in_order(names, block_list_name(self.model))
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


def vit_steps(vit: nn.Module) -> list[Step]:
    """``open_clip.transformer.VisionTransformer.forward`` as steps: embeddings (patch embedding,
    class token, positions, patch dropout, ln_pre) -> (B, 1 + grid**2, width) tokens, one step per
    residual block (tokens batch-first between steps), then pooling and projection."""
    transformer = vit.transformer

    def block(r: nn.Module) -> Step:
        def run(x: Tensor) -> Tensor:
            x = x if transformer.batch_first else x.transpose(0, 1)  # NLD -> LND
            if transformer.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(r, x, use_reentrant=False)  # as Transformer.forward (no mask)
            else:
                x = r(x, attn_mask=None)
            return x if transformer.batch_first else x.transpose(0, 1)

        return (r, run)

    def pool(x: Tensor) -> Tensor:
        pooled, _ = vit._pool(x)  # (B, width)
        return pooled if vit.proj is None else pooled @ vit.proj  # (B, embed_dim)

    if vit.output_tokens or not hasattr(vit, "_embeds"):
        raise NoSplit(
            "open_clip ViT: split only without output_tokens and with open_clip >= 2.26's "
            "VisionTransformer._embeds / _pool (upgrade open_clip_torch)"
        )
    return [(vit.conv1, vit._embeds), *(block(r) for r in transformer.resblocks), (vit.ln_post, pool)]
