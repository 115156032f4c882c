"""``model.init=<spec>``: start a DualEncoder's towers and heads from a pretrained model.

``resolve_init(cfg)`` turns a ``ModelConfig`` with ``init`` into the plain config that builds
that model: both towers are the two halves of the spec's model (``open_clip:`` or ``hf-clip:``
towers, each ending in the model's own projection), ``projection: none``, ``embed_dim`` the
model's, and ``init_logit_scale`` / ``init_logit_bias`` the values stored in its weights. So
``build_model`` gives a DualEncoder that embeds exactly as ``load_model(spec)`` does, and its
logit scale and bias are the spec's. The resolved config keeps ``init`` (with absolute paths):
``build_model`` resolves again, which checks that nothing contradicts it, and a run's
``config.yaml`` shows the towers that were built.

Specs, as ``clipkit.models.specs`` resolves them:

- ``open_clip:<config>[@<weights file>]``: ``<config>`` a built-in or clipkit config name, a
  model-config ``.json`` file or ``local-dir:<folder>``; a Hugging Face text model or tokenizer
  in the config must be a local folder (``towers_openclip.check_offline``);
- ``hf-clip:<folder>``: a Hugging Face ``CLIPModel`` / ``SiglipModel`` saved with
  ``save_pretrained`` (weights, tokenizer, image processor).

The spec fixes the towers' ``name``, ``weights``, ``image_size`` (vision) and ``context_length``
(text), and the model's ``embed_dim``, ``projection``, ``init_logit_scale`` and ``init_logit_bias``.
Leave them out: each must be its default or the spec's value, otherwise ``ConfigError`` names
it. One exception: when the spec has no logit bias (CLIP), ``init_logit_bias`` adds one (to
fine-tune a CLIP with the SigLIP loss). ``locked``, ``unlocked_layers``, ``lr_mult`` and ``augment`` apply to the pretrained towers
as to any other; ``max_logit_scale`` must be at least the spec's logit scale.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from clipkit.config import Config, ConfigError, ModelConfig
from clipkit.models.specs import spec_forms, spec_kind

HEADS = ("logit_scale", "logit_bias")


@dataclass(frozen=True)
class InitSource:
    """What a spec fixes in the model config (``resolve_init``)."""

    spec: str  # the spec with absolute paths: reloads the same model from any directory
    tower: str  # both towers' name
    weights: str
    image_size: int
    context_length: int
    embed_dim: int
    logit_scale: float  # log(1 / T), as stored
    logit_bias: float | None


def resolve_init(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with what ``cfg.init`` fixes filled in (module docstring); ``cfg`` itself without init."""
    if not cfg.init:
        return cfg
    try:
        src = init_source(cfg.init)
    except (ValueError, OSError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"model.init={cfg.init!r}: {err}") from err
    _check_agrees(cfg, src)
    if src.logit_scale > cfg.max_logit_scale:
        raise ConfigError(
            f"model.init={cfg.init!r} has a logit scale of {src.logit_scale:.4f} (1/T = "
            f"{math.exp(src.logit_scale):.1f}), above model.max_logit_scale={cfg.max_logit_scale:.4f}, "
            f"which would clamp it; set model.max_logit_scale={math.ceil(src.logit_scale * 1e4) / 1e4} or more"
        )
    vision = dataclasses.replace(cfg.vision, name=src.tower, weights=src.weights, image_size=src.image_size)
    text = dataclasses.replace(
        cfg.text, name=src.tower, weights=src.weights, context_length=src.context_length
    )
    return dataclasses.replace(
        cfg,
        init=src.spec,
        vision=vision,
        text=text,
        embed_dim=src.embed_dim,
        projection="none",
        init_logit_scale=src.logit_scale,
        init_logit_bias=cfg.init_logit_bias if src.logit_bias is None else src.logit_bias,
    )


def resolve_run_config(cfg: Config) -> Config:
    """A run's ``Config`` with ``model.init`` resolved: what the trainer builds and saves."""
    return dataclasses.replace(cfg, model=resolve_init(cfg.model)) if cfg.model.init else cfg


def init_source(spec: str) -> InitSource:
    """Tower names, sizes and heads of the model ``spec`` names; ``ConfigError`` for other kinds."""
    kind = spec_kind(spec)
    if kind == "open_clip":
        return _open_clip_source(spec)
    if kind == "hf_clip":
        return _hf_clip_source(spec)
    hint = f" did you mean open_clip:{spec}?" if spec.endswith(".json") else ""
    what = f"is a {kind.replace('_', ' ')}" if kind else f"is not a model spec ({spec_forms()})"
    raise ConfigError(
        f"model.init={spec!r} {what};{hint} model.init takes open_clip:<config>[@<weights file>] (config: "
        "a name, a model-config .json file or local-dir:<folder>) or hf-clip:<Hugging Face CLIP/SigLIP folder>"
    )


def _check_agrees(cfg: ModelConfig, src: InitSource) -> None:
    """Every key the spec fixes is its default or the spec's value (module docstring)."""
    default = ModelConfig()
    fixed = [
        ("vision.name", cfg.vision.name, default.vision.name, src.tower),
        ("vision.weights", cfg.vision.weights, default.vision.weights, src.weights),
        ("vision.image_size", cfg.vision.image_size, default.vision.image_size, src.image_size),
        ("text.name", cfg.text.name, default.text.name, src.tower),
        ("text.weights", cfg.text.weights, default.text.weights, src.weights),
        ("text.context_length", cfg.text.context_length, default.text.context_length, src.context_length),
        ("embed_dim", cfg.embed_dim, default.embed_dim, src.embed_dim),
        ("projection", cfg.projection, default.projection, "none"),
        ("init_logit_scale", cfg.init_logit_scale, default.init_logit_scale, src.logit_scale),
    ]
    if src.logit_bias is not None:  # a spec without a bias leaves room for one (CLIP -> SigLIP loss)
        fixed.append(("init_logit_bias", cfg.init_logit_bias, default.init_logit_bias, src.logit_bias))
    for key, value, dflt, wanted in fixed:
        if value != dflt and value != wanted:
            raise ConfigError(
                f"model.{key}={value!r} contradicts model.init={cfg.init!r}, which gives {wanted!r}: the "
                f"pretrained model fixes it; leave model.{key} out"
            )


# ----------------------------------------------------------------------------- open_clip


def _open_clip_source(spec: str) -> InitSource:
    from clipkit.models.towers_openclip import find_checkpoint, resolve_config

    config, _, weights = spec.removeprefix("open_clip:").partition("@")
    name, model_cfg = resolve_config(config)
    if name.startswith("local-dir:"):
        folder = Path(name.removeprefix("local-dir:")).resolve()
        if weights:
            raise ConfigError(
                f"model.init={spec!r}: a local-dir: model carries its own weights; drop '@{weights}'"
            )
        found = find_checkpoint(folder)
        if found is None:
            raise ConfigError(
                f"model.init={spec!r}: {folder} holds no weights file (open_clip_model.safetensors)"
            )
        config, weights, file = f"local-dir:{folder}", "bundled", found
    else:
        if weights and not Path(weights).is_file():
            raise ConfigError(f"model.init={spec!r}: weights file '{weights}' not found")
        config = str(Path(config).resolve()) if config.endswith(".json") else config
        weights = str(Path(weights).resolve()) if weights else ""
        file = weights
    if file:
        heads = read_tensors(file, HEADS)
        if "logit_scale" not in heads:
            raise ConfigError(
                f"model.init={spec!r}: '{file}' holds no logit_scale: not an open_clip checkpoint"
            )
    else:  # a random model, as open_clip initialises one
        heads = {"logit_scale": torch.tensor(model_cfg.get("init_logit_scale", math.log(1 / 0.07)))}
        if model_cfg.get("init_logit_bias") is not None:
            heads["logit_bias"] = torch.tensor(model_cfg["init_logit_bias"])
    vision_cfg, text_cfg = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    return InitSource(
        spec=f"open_clip:{config}" + (f"@{weights}" if weights and weights != "bundled" else ""),
        tower=f"open_clip:{config}",
        weights=weights,
        image_size=_square(vision_cfg.get("image_size", 224), spec),
        context_length=int(text_cfg.get("context_length", 77)),
        embed_dim=int(model_cfg["embed_dim"]),
        **_head_values(heads),
    )


def _square(size: Any, spec: str) -> int:
    sizes = set(size) if isinstance(size, (list, tuple)) else {size}
    if len(sizes) != 1:
        raise ConfigError(f"model.init={spec!r}: images of {size} pixels; clipkit towers take square images")
    return int(sizes.pop())


# ----------------------------------------------------------------------------- Hugging Face


def _hf_clip_source(spec: str) -> InitSource:
    from transformers import AutoConfig

    from clipkit.models.towers_hf_clip import KINDS, resolve_hf_clip_dir

    folder = resolve_hf_clip_dir(spec.removeprefix("hf-clip:")).resolve()
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type not in KINDS:
        raise ConfigError(
            f"model.init={spec!r} holds a '{config.model_type}' model, not a CLIPModel or SiglipModel"
        )
    vc, tc = config.vision_config, config.text_config
    if config.model_type == "clip":
        embed_dim = config.projection_dim
    else:
        embed_dim = vc.hidden_size
        if getattr(tc, "projection_size", tc.hidden_size) != embed_dim:
            raise ConfigError(
                f"model.init={spec!r}: the SigLIP text head gives {tc.projection_size} dimensions and the "
                f"image tower {embed_dim}; a dual encoder needs one embedding width"
            )
    return InitSource(
        spec=f"hf-clip:{folder}",
        tower=f"hf-clip:{folder}",
        weights="bundled",
        image_size=int(vc.image_size),
        context_length=int(tc.max_position_embeddings),
        embed_dim=int(embed_dim),
        **_head_values(read_tensors(_hf_weights_file(folder, spec), HEADS)),
    )


def _hf_weights_file(folder: Path, spec: str) -> Path:
    """The file holding ``logit_scale`` among a ``save_pretrained`` folder's weights."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded
        return folder / json.loads(index.read_text(encoding="utf-8"))["weight_map"]["logit_scale"]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise ConfigError(
        f"model.init={spec!r}: {folder} holds no weights (model.safetensors); save the model with "
        "model.save_pretrained(dir)"
    )


# ----------------------------------------------------------------------------- weights files


def read_tensors(path: str | Path, names: tuple[str, ...]) -> dict[str, Tensor]:
    """The tensors ``names`` (those present) of a weights file, without reading the others where the
    format allows (safetensors; torch zip files are memory-mapped). Unwraps ``state_dict`` / ``model``
    containers and a ``module.`` prefix, as open_clip's loader does."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            return {n: f.get_tensor(k) for n in names for k in (n, f"module.{n}") if k in keys}
    try:
        sd: Any = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    return {n: sd[k] for n in names for k in (n, f"module.{n}") if k in sd}


def _head_values(heads: dict[str, Tensor]) -> dict[str, float | None]:
    bias = heads.get("logit_bias")
    return {
        "logit_scale": float(heads["logit_scale"].reshape(())),  # float32 -> float: exact
        "logit_bias": None if bias is None else float(bias.reshape(())),
    }
