"""Every dual encoder seen through one API: the adapters that ``clipkit.models.specs`` returns.

An ``EvalModel`` has the DualEncoder's inference API, ``image_transform(train)``,
``tokenize(texts)``, ``encode_image(image=, normalize=)``, ``encode_text(tokens, normalize=)``,
plus ``name`` / ``pretrained`` (CLIP_benchmark's result fields), ``spec`` (as given),
``resolved`` (a spec that reloads exactly this model: what indexes record) and
``fingerprint()`` (image side; keys feature caches).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clipkit.errors import ClipkitError

METHODS = ("image_transform", "encode_image", "tokenize", "encode_text")


def _hash_tensors(h: Any, named: list[tuple[str, Tensor]]) -> None:
    for name, t in named:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


class EvalModel(nn.Module):
    """Base of the adapters: the DualEncoder inference API plus result-file metadata."""

    spec: str = ""  # as the user gave it
    resolved: str = ""  # reloads exactly this model (a run folder -> its checkpoint file)
    name: str = ""  # CLIP_benchmark "model"
    pretrained: str = ""  # CLIP_benchmark "pretrained"

    def image_side(self) -> nn.Module:
        """The modules that turn an image into its embedding (hashed by ``fingerprint``)."""
        raise NotImplementedError(f"{type(self).__name__} does not name its image side")

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the image side's weights and the image transform's settings."""
        h = hashlib.sha256(
            f"{type(self).__name__}|{transform_signature(self.image_transform(False))}".encode()
        )
        side = self.image_side()
        _hash_tensors(h, [*side.named_parameters(), *side.named_buffers()])
        return h.hexdigest()[:16]


def transform_signature(transform: Any) -> str:
    """``repr(transform)`` without memory addresses: the same in every process, so a cache keyed
    by it (a ``Compose`` holding a plain function prints ``<function f at 0x7f...>``) is found again."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def _features(out: Any) -> Tensor:
    # transformers < 5 returns the projected features; 5.x a ModelOutput with them as pooler_output.
    return out if isinstance(out, Tensor) else out.pooler_output


def _normalized(x: Tensor, normalize: bool) -> Tensor:
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


# ----------------------------------------------------------------------------- clipkit


class _Delegating(EvalModel):
    """An adapter whose ``model`` already has the DualEncoder API: the four methods pass through."""

    model: Any

    def image_transform(self, train: bool = False) -> Any:
        return self.model.image_transform(train)

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.model.tokenize(texts)

    def encode_image(self, image: Tensor, normalize: bool = True) -> Tensor:
        return self.model.encode_image(image=image, normalize=normalize)

    def encode_text(self, text: Tensor, normalize: bool = True) -> Tensor:
        return self.model.encode_text(text, normalize=normalize)


class ClipkitModel(_Delegating):
    """A clipkit ``DualEncoder``: trained (run folder, checkpoint) or built from a recipe."""

    def __init__(self, model: nn.Module, spec: str, resolved: str, pretrained: str):
        super().__init__()
        self.model = model
        self.spec, self.resolved, self.name, self.pretrained = spec, resolved, f"clipkit:{spec}", pretrained

    def image_side(self) -> nn.Module:
        return nn.ModuleList([self.model.vision, self.model.vision_proj])


class FactoryModel(_Delegating):
    """Whatever a ``module:function`` factory returned, with the four DualEncoder methods."""

    def __init__(self, model: Any, spec: str):
        super().__init__()
        self.model = model  # a submodule when it is an nn.Module: follows .to() and .eval()
        self.spec = self.resolved = self.name = spec

    def image_side(self) -> nn.Module:
        if not isinstance(self.model, nn.Module):
            raise ClipkitError(
                f"model '{self.spec}' is a {type(self.model).__name__}, not an nn.Module, so its weights "
                "cannot be fingerprinted (the linear-probe feature cache needs it): give it a "
                "fingerprint() method, or evaluate without --cache-dir"
            )
        return self.model

    def fingerprint(self) -> str:
        own = getattr(self.model, "fingerprint", None)
        return str(own()) if callable(own) else super().fingerprint()


# ----------------------------------------------------------------------------- open_clip


class OpenClipModel(EvalModel):
    """An open_clip ``CLIP`` / ``CustomTextCLIP`` with its eval transform, tokenizer and model config."""

    def __init__(self, clip: nn.Module, transform: Any, tokenizer: Any, model_cfg: dict[str, Any]):
        super().__init__()
        self.clip, self.transform, self.tokenizer, self.model_cfg = clip, transform, tokenizer, model_cfg

    def image_transform(self, train: bool = False) -> Any:
        return self.transform

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.tokenizer(list(texts)).long()

    def encode_image(self, image: Tensor, normalize: bool = True) -> Tensor:
        return self.clip.encode_image(image, normalize=normalize)

    def encode_text(self, text: Tensor, normalize: bool = True) -> Tensor:
        return self.clip.encode_text(text, normalize=normalize)

    def image_side(self) -> nn.Module:
        return self.clip.visual


# ----------------------------------------------------------------------------- Hugging Face


class HFImageTransform:
    """PIL -> (3, H, W) pixel values with the model's own Hugging Face image processor."""

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, image: Any) -> Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"HFImageTransform({self.processor.to_json_string()})"


class HFTokens:
    """texts -> (B, L) token ids padded to the model's text length (as CLIP / SigLIP were trained)."""

    def __init__(self, tokenizer: Any, length: int):
        self.tokenizer, self.length = tokenizer, length

    def __call__(self, texts: list[str]) -> Tensor:
        enc = self.tokenizer(
            list(texts), padding="max_length", max_length=self.length, truncation=True, return_tensors="pt"
        )
        return enc["input_ids"]


class HFClipModel(EvalModel):
    """A transformers ``CLIPModel`` or ``SiglipModel`` (anything with get_{image,text}_features).

    Text is padded to ``max_position_embeddings`` and encoded without an attention mask:
    CLIP pools at the first end-of-text token under a causal mask (padding after it cannot
    change it) and SigLIP was trained on max-length padding without a mask.
    """

    def __init__(self, model: nn.Module, processor: Any, tokenizer: Any, spec: str, folder: Path):
        super().__init__()
        self.model, self.processor, self.tokenizer, self.folder = model, processor, tokenizer, folder
        self.transform = HFImageTransform(processor)
        length = int(model.config.text_config.max_position_embeddings)
        self.tokens = HFTokens(tokenizer, length)
        self.spec, self.name, self.pretrained = spec, f"hf-clip:{folder.name}", str(folder)
        self.resolved = f"hf-clip:{folder.resolve()}"

    def image_transform(self, train: bool = False) -> Any:
        return self.transform

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.tokens(texts)

    def encode_image(self, image: Tensor, normalize: bool = True) -> Tensor:
        return _normalized(_features(self.model.get_image_features(pixel_values=image)), normalize)

    def encode_text(self, text: Tensor, normalize: bool = True) -> Tensor:
        return _normalized(_features(self.model.get_text_features(input_ids=text)), normalize)

    def image_side(self) -> nn.Module:
        parts = [
            getattr(self.model, n) for n in ("vision_model", "visual_projection") if hasattr(self.model, n)
        ]
        return nn.ModuleList(parts)
