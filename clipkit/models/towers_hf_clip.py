"""``hf-clip:<dir>`` towers: the image or text half of a Hugging Face ``CLIPModel`` / ``SiglipModel``.

Each half ends in the model's own head, so ``out_dim`` is the model's embedding width and a
DualEncoder with ``projection: none`` computes exactly ``get_image_features`` /
``get_text_features`` (what ``--model hf-clip:<dir>`` evaluates). When both towers name the same
folder and weights, the Hugging Face model is loaded once and each tower takes its half.

``<dir>`` is a local folder written by ``save_pretrained`` (``config.json``, tokenizer, image
processor), or the name of a bundled tiny config in ``hf_clip_configs/`` (``clipkit-tiny-clip``,
``clipkit-tiny-siglip``: config, tokenizer and processor, no weights; for tests and smoke runs).
Weights: ``bundled`` (the folder's own), ``""`` (random init from ``config.json``) or a local file
holding the whole model's state dict. Nothing is downloaded.

Text is padded to ``context_length`` and encoded without an attention mask, as the evaluation
adapter does: CLIP pools at the first end-of-text token under a causal mask (so a context shorter
than the model's positions gives the same features for texts that fit), SigLIP at the last
position (so its context must be the model's). Images go through the folder's image processor;
``augment: true`` trains on a random-resized crop with the processor's mean and std instead.

Layers, bottom to top: embeddings (and CLIP's pre-norm) | encoder block 0 | ... | final norm,
pooling head and projection.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from clipkit.config import TowerConfig
from clipkit.models.adapters import HFImageTransform, HFTokens
from clipkit.models.tower_base import (
    TOWERS,
    NoSplit,
    Step,
    Tower,
    TowerSplit,
    image_transform,
    load_state_dict_file,
    set_hf_grad_checkpointing,
    split_steps,
)
from clipkit.models.towers_hf import _block_list_name as block_list_name

BUNDLED = Path(__file__).parent / "hf_clip_configs"
KINDS = ("clip", "siglip")  # transformers model_type of CLIPModel / SiglipModel

__all__ = ["HFClipTower", "block_list_name", "blocks_in_order", "hf_model_of", "resolve_hf_clip_dir"]


def resolve_hf_clip_dir(arg: str) -> Path:
    """The local folder of ``hf-clip:<arg>``: a bundled tiny config's name or a path."""
    if "/" not in arg and (BUNDLED / arg / "config.json").is_file():
        return BUNDLED / arg
    path = Path(arg).expanduser()
    if not (path / "config.json").is_file():
        bundled = ", ".join(sorted(p.name for p in BUNDLED.iterdir() if p.is_dir()))
        raise FileNotFoundError(
            f"hf-clip:{arg}: not a local Hugging Face model folder (no config.json); save one with "
            f"model.save_pretrained(dir), tokenizer.save_pretrained(dir) and "
            f"image_processor.save_pretrained(dir) (nothing is downloaded), or name a bundled config: {bundled}"
        )
    return path


def load_hf_clip(arch: str, weights: str) -> nn.Module:
    """The ``CLIPModel`` / ``SiglipModel`` of ``hf-clip:<arch>`` with ``weights`` (module docstring)."""
    from transformers import AutoConfig, AutoModel

    path = resolve_hf_clip_dir(arch)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type not in KINDS:
        raise ValueError(
            f"hf-clip:{arch} holds a '{config.model_type}' model; hf-clip towers are the halves of a "
            "CLIPModel or SiglipModel"
        )
    if weights == "bundled":
        try:
            return AutoModel.from_pretrained(path, local_files_only=True)
        except OSError as err:
            raise ValueError(
                f"hf-clip:{arch}: the folder holds no weights ({err}); weights='' builds a random model"
            ) from err
    model = AutoModel.from_config(config)
    if weights:
        missing, unexpected = model.load_state_dict(load_state_dict_file(weights), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"weights '{weights}' do not fit hf-clip:{arch}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    return model


def _shared_hf_clip(arch: str, weights: str, shared: dict[str, Any] | None) -> nn.Module:
    """One model for both towers of a DualEncoder that name the same folder and weights."""
    if shared is None:
        return load_hf_clip(arch, weights)
    key = f"hf-clip:{arch}@{weights}"
    if key not in shared:
        shared[key] = load_hf_clip(arch, weights)
    return shared[key]


def blocks_in_order(names: list[str], block_prefix: str) -> list[list[str]]:
    """Parameter names (in registration order) -> [before the blocks] + [block i ...] + [after]."""
    rx = re.compile(rf"^{re.escape(block_prefix)}\.(\d+)\.")
    before: list[str] = []
    blocks: dict[int, list[str]] = {}
    after: list[str] = []
    for name in names:
        m = rx.match(name)
        if m:
            blocks.setdefault(int(m.group(1)), []).append(name)
        else:
            (after if blocks else before).append(name)
    return [g for g in [before, *(blocks[i] for i in sorted(blocks)), after] if g]


class HFVisionHalf(nn.Module):
    """``vision_model`` then CLIP's ``visual_projection`` (SigLIP's head is inside ``vision_model``)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.vision_model = hf.vision_model
        self.visual_projection = getattr(hf, "visual_projection", None)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.vision_model(pixel_values=pixels).pooler_output  # (B, width): class token / MAP head
        return x if self.visual_projection is None else self.visual_projection(x)  # (B, embed)


class HFTextHalf(nn.Module):
    """``text_model`` then CLIP's ``text_projection`` (SigLIP's head is inside ``text_model``)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.text_model = hf.text_model
        self.text_projection = getattr(hf, "text_projection", None)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.text_model(input_ids=tokens).pooler_output  # (B, width): eos token / last token + head
        return x if self.text_projection is None else self.text_projection(x)  # (B, embed)


@TOWERS.register("hf-clip")
class HFClipTower(Tower):
    """``hf-clip:<dir>``: images (B, 3, H, W) or tokens (B, L) -> (B, embed) as the HF model embeds them."""

    examples = (
        ("vision", {"name": "hf-clip:clipkit-tiny-clip", "image_size": 32}),
        ("text", {"name": "hf-clip:clipkit-tiny-clip", "context_length": 16}),
        ("vision", {"name": "hf-clip:clipkit-tiny-siglip", "image_size": 32}),
        ("text", {"name": "hf-clip:clipkit-tiny-siglip", "context_length": 16}),
    )

    def __init__(self, arch: str, cfg: TowerConfig, modality: str, shared: dict[str, Any] | None = None):
        super().__init__(f"hf-clip:{arch}", modality)
        self.folder = resolve_hf_clip_dir(arch)
        hf = _shared_hf_clip(arch, cfg.weights, shared)
        self.kind = hf.config.model_type
        if modality == "vision":
            self._init_vision(hf, cfg)
        else:
            self._init_text(hf, cfg)

    def _init_vision(self, hf: nn.Module, cfg: TowerConfig) -> None:
        from transformers import AutoImageProcessor

        vc = hf.config.vision_config
        if cfg.image_size != vc.image_size:
            raise ValueError(
                f"{self.spec}: image_size={cfg.image_size} but the model takes {vc.image_size}-pixel images; "
                f"set image_size={vc.image_size} on the vision tower"
            )
        self.model = HFVisionHalf(hf)
        self.out_dim = int(hf.config.projection_dim if self.kind == "clip" else vc.hidden_size)
        self.processor = AutoImageProcessor.from_pretrained(self.folder, local_files_only=True)
        self.image_size, self.augment = int(vc.image_size), cfg.augment
        self.deterministic_transform, self.augmentation = not cfg.augment, cfg.augmentation
        self._fingerprint_extra = f"{self.processor.to_json_string()}|augment={cfg.augment}"

    def _init_text(self, hf: nn.Module, cfg: TowerConfig) -> None:
        from transformers import AutoTokenizer

        tc = hf.config.text_config
        length = int(tc.max_position_embeddings)
        if cfg.context_length > length or (self.kind == "siglip" and cfg.context_length != length):
            need = (
                f"at most {length}"
                if self.kind == "clip"
                else f"{length} (SigLIP pools at the last position)"
            )
            raise ValueError(f"{self.spec}: context_length={cfg.context_length}; this model's must be {need}")
        self.model = HFTextHalf(hf)
        width = (
            hf.config.projection_dim
            if self.kind == "clip"
            else getattr(tc, "projection_size", tc.hidden_size)
        )
        self.out_dim = int(width)
        tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        self.tokenizer = HFTokens(tokenizer, cfg.context_length)
        self._fingerprint_extra = f"L={cfg.context_length}|{type(tokenizer).__name__}|{len(tokenizer)}"

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)  # images (B, 3, H, W) or tokens (B, L) -> (B, out_dim)

    def transform(self, train: bool) -> Any:
        if self.modality != "vision":
            return super().transform(train)
        if train and self.augment:
            mean, std = self.processor.image_mean, self.processor.image_std
            return image_transform(self.image_size, mean, std, True, self.augmentation)
        return HFImageTransform(self.processor)

    def tokenize(self, texts: list[str]) -> Tensor:
        if self.modality != "text":
            return super().tokenize(texts)
        return self.tokenizer(list(texts)).long()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_hf_grad_checkpointing(self.model, self.spec, self.modality, enable)  # the encoder's blocks

    def split_at(self, unlocked_layers: int) -> TowerSplit:
        if self.modality != "vision":
            raise NoSplit(f"{self.spec}: only the image half of an hf-clip model is split")
        return split_steps(self, hf_vision_steps(self.model, self.spec), unlocked_layers)

    def param_groups(self) -> list[list[str]]:
        names = [n for n, _ in self.model.named_parameters()]
        return blocks_in_order(names, block_list_name(self.model))


def _encoder_layer(layer: nn.Module) -> Step:
    # transformers 5: layer(hidden, attention_mask) -> hidden; 4.x: a tuple, and CLIP's layer
    # takes a causal mask too (None for images, as the vision encoder passes).
    causal = "causal_attention_mask" in inspect.signature(layer.forward).parameters
    extra = {"causal_attention_mask": None} if causal else {}

    def run(x: Tensor) -> Tensor:
        out = layer(x, None, **extra)
        return out[0] if isinstance(out, tuple) else out  # (B, 1 + patches, width)

    return (layer, run)


def hf_vision_steps(half: HFVisionHalf, spec: str) -> list[Step]:
    """``HFVisionHalf.forward`` as steps: embeddings (+ CLIP's pre-norm) -> (B, tokens, width), one
    step per encoder layer, then CLIP's class-token pooling, post-norm and projection, or SigLIP's
    post-norm and attention-pooling head."""
    vm = half.vision_model
    steps: list[Step] = [(vm.embeddings, lambda px: vm.embeddings(px, interpolate_pos_encoding=False))]
    if hasattr(vm, "pre_layrnorm"):  # CLIP
        steps.append((vm.pre_layrnorm, vm.pre_layrnorm))
    steps += [_encoder_layer(layer) for layer in vm.encoder.layers]
    if half.visual_projection is not None:  # CLIP: class token -> post-norm -> projection
        steps.append((vm.post_layernorm, lambda x: half.visual_projection(vm.post_layernorm(x[:, 0, :]))))
    elif getattr(vm, "use_head", False):  # SigLIP: post-norm -> multi-head attention pooling
        steps.append((vm.post_layernorm, lambda x: vm.head(vm.post_layernorm(x))))
    else:
        raise NoSplit(f"{spec}: a vision model without a pooling head has no pooled output to split")
    return steps


def hf_model_of(model: nn.Module) -> tuple[nn.Module, Any, Any]:
    """(Hugging Face model, image processor, tokenizer) holding a DualEncoder's current weights,
    for a DualEncoder whose towers are both halves of one ``hf-clip:`` model (``projection: none``).
    """
    from transformers import AutoConfig, AutoModel

    vision, text = model.vision, model.text
    config = AutoConfig.from_pretrained(vision.folder, local_files_only=True)
    hf = AutoModel.from_config(config)
    own = hf.state_dict()
    state = {**vision.model.state_dict(), **text.model.state_dict()}
    heads = {"logit_scale": model.logit_scale, "logit_bias": model.logit_bias}
    for name, value in heads.items():
        if name in own and value is not None:
            state[name] = value.detach().reshape(own[name].shape)  # clipkit () -> CLIP () / SigLIP (1,)
    hf.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return hf.eval(), vision.processor, text.tokenizer.tokenizer
