"""Any dual encoder seen through one API, from a model spec string.

``load_eval_model(spec)`` resolves:

- ``runs/NAME`` or ``runs/NAME/checkpoints/step_*.pt``: a clipkit run folder or checkpoint;
- ``open_clip:<config>[@<weights file>]``: an open_clip model; ``<config>`` is a built-in or
  clipkit config name (``ViT-B-32``, ``clipkit-tiny-ViT``), a model-config JSON file, or
  ``local-dir:<dir>`` (``open_clip_config.json`` + weights, e.g. what ``clipkit export``
  writes). Without ``@weights`` the model is randomly initialised;
- ``hf-clip:<dir>``: a Hugging Face ``CLIPModel`` / ``SiglipModel`` saved in a local folder
  with its tokenizer and image processor (``save_pretrained``).

Every adapter is an ``EvalModel``: ``image_transform(train)``, ``tokenize(texts)``,
``encode_image(image=, normalize=)``, ``encode_text(tokens, normalize=)`` (the DualEncoder
API the evaluation drivers use), plus ``name`` / ``pretrained`` for CLIP_benchmark's result
fields and ``fingerprint()`` (image side) for the linear-probe feature cache. Nothing is
ever downloaded: weights, configs and tokenizers must be local.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from clipkit.errors import ClipkitError

SPEC_FORMS = (
    "a clipkit run folder or checkpoint file, "
    "'open_clip:<config>[@<weights file>]' (config: a name, a JSON file or local-dir:<dir>), "
    "or 'hf-clip:<local Hugging Face CLIP/SigLIP folder>'"
)
CLIPKIT_CONFIGS = Path(__file__).resolve().parents[1] / "models" / "open_clip_configs"


class ModelSpecError(ClipkitError, ValueError):
    """A model spec that names nothing loadable, or weights that do not fit it."""


def safe_name(spec: str, max_len: int = 60) -> str:
    """A file-name-safe, collision-resistant name for any model or dataset spec.

    Characters outside ``[A-Za-z0-9._+-]`` become ``_`` (so no path separators, no ``..``);
    when that loses anything, or the name is long, an 8-hex digest of the full spec is
    appended so two different specs never share a file name.
    """
    slug = re.sub(r"[^A-Za-z0-9._+-]+", "_", spec).strip("._-") or "model"
    slug = re.sub(r"\.{2,}", ".", slug)
    if slug == spec and len(slug) <= max_len:
        return slug
    digest = hashlib.sha1(spec.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slug[:max_len].rstrip('._-')}-{digest}"


def _hash_tensors(h: Any, named: list[tuple[str, Tensor]]) -> None:
    for name, t in named:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


class EvalModel(nn.Module):
    """Base of the adapters: the DualEncoder evaluation API plus result-file metadata."""

    spec: str = ""
    name: str = ""  # CLIP_benchmark "model"
    pretrained: str = ""  # CLIP_benchmark "pretrained"

    def image_side(self) -> nn.Module:
        """The modules that turn an image into its embedding (hashed by ``fingerprint``)."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """sha256 (16 hex) of the image side's weights and the image transform's settings."""
        h = hashlib.sha256(f"{type(self).__name__}|{self.image_transform(False)!r}".encode())
        side = self.image_side()
        _hash_tensors(h, [*side.named_parameters(), *side.named_buffers()])
        return h.hexdigest()[:16]


def _features(out: Any) -> Tensor:
    # transformers < 5 returns the projected features; 5.x a ModelOutput with them as pooler_output.
    return out if isinstance(out, Tensor) else out.pooler_output


def _normalized(x: Tensor, normalize: bool) -> Tensor:
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


# ----------------------------------------------------------------------------- clipkit


class ClipkitModel(EvalModel):
    """A trained clipkit ``DualEncoder`` (run folder or checkpoint)."""

    def __init__(self, model: nn.Module, spec: str, checkpoint: Path):
        super().__init__()
        self.model = model
        self.spec, self.name, self.pretrained = spec, f"clipkit:{spec}", str(checkpoint)

    def image_transform(self, train: bool = False) -> Any:
        return self.model.image_transform(train)

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.model.tokenize(texts)

    def encode_image(self, image: Tensor, normalize: bool = True) -> Tensor:
        return self.model.encode_image(image=image, normalize=normalize)

    def encode_text(self, text: Tensor, normalize: bool = True) -> Tensor:
        return self.model.encode_text(text, normalize=normalize)

    def image_side(self) -> nn.Module:
        return nn.ModuleList([self.model.vision, self.model.vision_proj])


def load_clipkit(spec: str) -> ClipkitModel:
    from clipkit.training.load import load_trained

    model, _cfg, ckpt = load_trained(spec)
    return ClipkitModel(model, spec, ckpt)


# ----------------------------------------------------------------------------- open_clip


class OpenClipModel(EvalModel):
    """An open_clip ``CLIP`` / ``CustomTextCLIP`` with its eval transform and tokenizer."""

    def __init__(self, clip: nn.Module, transform: Any, tokenizer: Any, spec: str, name: str, weights: str):
        super().__init__()
        self.clip, self.transform, self.tokenizer = clip, transform, tokenizer
        self.spec, self.name, self.pretrained = spec, name, weights

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


def _open_clip_name(config: str) -> str:
    """The open_clip model name for ``config``: a registered name, ``local-dir:`` or a JSON file."""
    import open_clip

    if config.startswith("local-dir:"):
        folder = Path(config.removeprefix("local-dir:"))
        if not (folder / "open_clip_config.json").is_file():
            raise ModelSpecError(f"open_clip:{config}: '{folder}' has no open_clip_config.json")
        return config
    path = Path(config)
    if config.endswith(".json"):
        if not path.is_file():
            raise ModelSpecError(f"open_clip config file '{config}' not found")
        import json

        data = json.loads(path.read_text(encoding="utf-8"))
        if "model_cfg" in data:  # the local-dir / hub layout: the folder is the model
            if path.name != "open_clip_config.json":
                raise ModelSpecError(
                    f"'{config}' holds 'model_cfg' (the local-dir layout); name its folder instead: "
                    f"open_clip:local-dir:{path.parent}"
                )
            return f"local-dir:{path.parent}"
        open_clip.add_model_config(path)
        return path.stem
    open_clip.add_model_config(CLIPKIT_CONFIGS)
    if open_clip.get_model_config(config) is None:
        from clipkit.registry import suggest

        raise ModelSpecError(
            f"unknown open_clip config '{config}';{suggest(config, open_clip.list_models())} "
            "give a built-in name, a model-config .json file, or local-dir:<folder>"
        )
    return config


def _check_offline(name: str) -> None:
    import open_clip

    cfg = open_clip.get_model_config(name) or {}
    text = cfg.get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        ref = text.get(key)
        if ref and not Path(ref).is_dir():
            raise ModelSpecError(
                f"open_clip:{name} needs the Hugging Face model '{ref}' ({key}), which is not a local "
                "folder; nothing is downloaded: point the config at a local copy"
            )


def _weights_error(name: str, weights: str, err: Exception) -> ModelSpecError:
    text = str(err).strip()
    if "Missing key" in text or "Unexpected key" in text or "size mismatch" in text:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = "; ".join(lines[1:4])[:400]
        return ModelSpecError(
            f"weights '{weights}' do not fit open_clip config '{name}': they come from another "
            f"architecture ({detail})"
        )
    first = text.splitlines()[0] if text else type(err).__name__
    return ModelSpecError(
        f"cannot read weights '{weights}': the file is truncated or corrupt ({type(err).__name__}: {first})"
    )


def load_open_clip(spec: str) -> OpenClipModel:
    import open_clip

    config, _, weights = spec.removeprefix("open_clip:").partition("@")
    if not config:
        raise ModelSpecError(f"'{spec}': no open_clip config; expected open_clip:<config>[@<weights file>]")
    name = _open_clip_name(config)
    if weights and name.startswith("local-dir:"):
        raise ModelSpecError(f"'{spec}': a local-dir: model carries its own weights; drop '@{weights}'")
    if weights and not Path(weights).is_file():
        raise ModelSpecError(f"'{spec}': weights file '{weights}' not found")
    _check_offline(name)
    try:
        # No tower-level hub or package weights: a spec without @weights is a random model.
        clip, _, transform = open_clip.create_model_and_transforms(
            name, pretrained=weights or None, pretrained_image=False, pretrained_text=False
        )
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        if weights or name.startswith("local-dir:"):
            raise _weights_error(name, weights or name, err) from err
        raise
    tokenizer = open_clip.get_tokenizer(name)
    label = name.removeprefix("local-dir:") if name.startswith("local-dir:") else name
    return OpenClipModel(clip.eval(), transform, tokenizer, spec, label, weights or name)


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
        self.model = model
        self.transform = HFImageTransform(processor)
        length = int(model.config.text_config.max_position_embeddings)
        self.tokens = HFTokens(tokenizer, length)
        self.spec, self.name, self.pretrained = spec, f"hf-clip:{folder.name}", str(folder)

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


def load_hf_clip(spec: str) -> HFClipModel:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    folder = Path(spec.removeprefix("hf-clip:")).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelSpecError(
            f"'{spec}': '{folder}' is not a local Hugging Face model folder (no config.json); "
            "save one with model.save_pretrained(dir), tokenizer.save_pretrained(dir) and "
            "image_processor.save_pretrained(dir)"
        )
    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except OSError as err:
        raise ModelSpecError(f"'{spec}': cannot load the model, tokenizer or image processor: {err}") from err
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise ModelSpecError(
            f"'{spec}' is a {type(model).__name__}, not a dual encoder (no get_image_features / get_text_features)"
        )
    return HFClipModel(model.eval(), processor, tokenizer, spec, folder)


# ----------------------------------------------------------------------------- dispatch


def load_eval_model(spec: str, device: str | torch.device = "cpu") -> EvalModel:
    """The ``EvalModel`` named by ``spec`` (see module docstring), in eval mode on ``device``."""
    if spec.startswith("open_clip:"):
        model: EvalModel = load_open_clip(spec)
    elif spec.startswith("hf-clip:"):
        model = load_hf_clip(spec)
    elif Path(spec).exists():
        model = load_clipkit(spec)
    else:
        prefix = spec.split(":", 1)[0] if ":" in spec else ""
        hint = ""
        if prefix:
            from clipkit.registry import suggest

            hint = suggest(prefix, ["open_clip", "hf-clip"])
        raise ModelSpecError(f"model '{spec}' not found;{hint} a model is {SPEC_FORMS}")
    return model.to(device).eval()
