"""One registry of ``--model`` spec kinds, shared by every command that loads a model.

``load_model(spec)`` resolves, with the kinds registered here:

- ``run_folder``: ``runs/NAME``, a clipkit run folder (its newest good checkpoint);
- ``checkpoint``: ``runs/NAME/checkpoints/step_*.pt`` (the model config is inside);
- ``open_clip``: ``open_clip:<config>[@<weights file>]``; ``<config>`` is a built-in or
  clipkit config name (``ViT-B-32``, ``clipkit-tiny-ViT``), a model-config JSON file, or
  ``local-dir:<dir>`` (``open_clip_config.json`` + weights, e.g. what ``clipkit export``
  writes). Without ``@weights`` the model is randomly initialised;
- ``hf_clip``: ``hf-clip:<dir>``, a Hugging Face ``CLIPModel`` / ``SiglipModel`` saved in a
  local folder with its tokenizer and image processor (``save_pretrained``);
- ``recipe``: ``train/NAME.yaml``, towers as the recipe says (``overrides`` apply), projection
  heads untrained and seeded, so the same recipe always gives the same embeddings;
- ``module_function``: ``package.module:function``, any factory returning an object with
  ``image_transform``, ``encode_image``, ``tokenize`` and ``encode_text``.

Every kind returns an ``EvalModel`` (``clipkit.models.adapters``). Adding a kind is one
function decorated with ``@model_spec(name, form, prefix=... | claims=...)``; ``clipkit eval``,
``clipkit index``, ``clipkit data filter``, ``clipkit export`` and distillation teachers
see it at once. Nothing is ever downloaded: weights, configs and tokenizers must be local.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import pickle
import re
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipkit.errors import ClipkitError
from clipkit.models import local_dir
from clipkit.models.adapters import (
    METHODS,
    ClipkitModel,
    EvalModel,
    FactoryModel,
    HFClipModel,
    OpenClipModel,
)
from clipkit.registry import Registry, suggest

MODEL_SPECS = Registry("model spec kind")
CLIPKIT_CONFIGS = Path(__file__).resolve().parent / "open_clip_configs"
_ORDER = itertools.count()  # registration order: the order kinds are listed in messages


class ModelSpecError(ClipkitError, ValueError):
    """A model spec that names nothing loadable, or weights that do not fit it."""


def model_spec(
    name: str,
    form: str,
    prefix: str = "",
    claims: Callable[[str], bool] | None = None,
    takes_overrides: bool = False,
) -> Callable[[Callable[..., EvalModel]], Callable[..., EvalModel]]:
    """Register ``load(spec, overrides) -> EvalModel`` as spec kind ``name``.

    A kind claims the specs starting with ``prefix`` (e.g. ``"open_clip:"``) or, without a
    prefix, those for which ``claims(spec)`` is true; a spec whose prefix belongs to a kind is
    never offered to the prefix-less ones. ``form`` describes the spec in error messages.
    """

    def deco(fn: Callable[..., EvalModel]) -> Callable[..., EvalModel]:
        fn.form, fn.prefix, fn.takes_overrides = form, prefix, takes_overrides  # type: ignore[attr-defined]
        fn.claims = claims or (lambda spec: bool(prefix) and spec.startswith(prefix))  # type: ignore[attr-defined]
        fn.order = next(_ORDER)  # type: ignore[attr-defined]
        return MODEL_SPECS.register(name)(fn)

    return deco


def _kinds() -> list[Callable[..., EvalModel]]:
    return sorted((MODEL_SPECS.get(n) for n in MODEL_SPECS.names()), key=lambda k: k.order)


def spec_forms() -> str:
    """Every registered form, for help texts and errors."""
    forms = [k.form for k in _kinds()]
    return ", ".join(forms[:-1]) + f" or {forms[-1]}" if len(forms) > 1 else "".join(forms)


def spec_kind(spec: str) -> str | None:
    """The name of the kind that claims ``spec``, or None."""
    kinds = _kinds()
    prefixed = [k for k in kinds if k.prefix and spec.startswith(k.prefix)]
    found = prefixed or [k for k in kinds if not k.prefix and k.claims(spec)]
    return found[0].registry_name if found else None


def load_model(spec: str, overrides: Sequence[str] = (), device: str | torch.device = "cpu") -> EvalModel:
    """The ``EvalModel`` named by ``spec`` (module docstring), in eval mode on ``device``.

    ``overrides`` (``key=value``) apply to the kinds that build from a config (a recipe).
    """
    spec = str(spec)
    name = spec_kind(spec)
    if name is None:
        prefix = spec.split(":", 1)[0] if ":" in spec else ""
        known = [k.prefix.rstrip(":") for k in _kinds() if k.prefix]
        hint = suggest(prefix, known) if prefix else ""
        raise ModelSpecError(f"model '{spec}' not found;{hint} a model is {spec_forms()}")
    kind = MODEL_SPECS.get(name)
    if overrides and not kind.takes_overrides:
        raise ModelSpecError(
            f"model '{spec}' is a {name.replace('_', ' ')}: overrides ({', '.join(overrides)}) apply "
            "to a recipe .yaml only; a checkpoint or a pretrained model holds its own config"
        )
    model = kind(spec, list(overrides))
    return model.to(device).eval()


def dual_encoder_of(model: Any) -> nn.Module | None:
    """The clipkit ``DualEncoder`` inside an adapter (run folder, checkpoint, recipe, or a
    factory that returned one), or None for other families."""
    from clipkit.models.dual_encoder import DualEncoder

    inner = getattr(model, "model", None)
    return (
        inner if isinstance(model, (ClipkitModel, FactoryModel)) and isinstance(inner, DualEncoder) else None
    )


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


# ----------------------------------------------------------------------------- clipkit


def _is_recipe(spec: str) -> bool:
    return Path(spec).suffix in (".yaml", ".yml") and Path(spec).is_file()


@model_spec("run_folder", "a clipkit run folder", claims=lambda s: Path(s).is_dir())
def load_run_folder(spec: str, overrides: list[str]) -> EvalModel:
    from clipkit.models.load import load_trained

    folder = Path(spec)
    if folder.is_dir() and not (folder / "checkpoints").is_dir():
        for marker, form in (("open_clip_config.json", "open_clip:local-dir:"), ("config.json", "hf-clip:")):
            if (folder / marker).is_file():
                raise ModelSpecError(
                    f"'{spec}' is not a clipkit run folder (no checkpoints/) but holds {marker}: "
                    f"did you mean --model {form}{spec}?"
                )
    model, _cfg, ckpt = load_trained(spec)
    return ClipkitModel(model, spec, str(ckpt.resolve()), str(ckpt))


@model_spec(
    "checkpoint",
    "a checkpoint file written by clipkit train",
    claims=lambda s: Path(s).is_file() and not _is_recipe(s),
)
def load_checkpoint(spec: str, overrides: list[str]) -> EvalModel:
    return load_run_folder(spec, overrides)


@model_spec(
    "recipe",
    "a recipe .yaml (towers as it says, projections untrained)",
    claims=_is_recipe,
    takes_overrides=True,
)
def load_recipe(spec: str, overrides: list[str]) -> EvalModel:
    from clipkit.config import load_config
    from clipkit.models import build_model

    cfg = load_config(spec, overrides)
    torch.manual_seed(0)  # untrained heads of a recipe: the same every time
    resolved = str(Path(spec).resolve())
    return ClipkitModel(build_model(cfg.model), spec, resolved, resolved)


def _is_module_function(spec: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec) is not None and not Path(spec).exists()


@model_spec(
    "module_function",
    "'package.module:function' (a factory of a model with image_transform, encode_image, tokenize, "
    "encode_text)",
    claims=_is_module_function,
)
def load_module_function(spec: str, overrides: list[str]) -> EvalModel:
    module, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ModelSpecError(f"model '{spec}': cannot import it ({e})") from None
    model = factory()
    missing = [m for m in METHODS if not callable(getattr(model, m, None))]
    if missing:
        raise ModelSpecError(f"model '{spec}': the model lacks {', '.join(missing)}")
    return FactoryModel(model, spec)


# ----------------------------------------------------------------------------- open_clip


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
        raise ModelSpecError(
            f"unknown open_clip config '{config}';{suggest(config, open_clip.list_models())} "
            "give a built-in name, a model-config .json file, or local-dir:<folder>"
        )
    return config


def _model_cfg(name: str) -> dict[str, Any]:
    import open_clip

    if name.startswith("local-dir:"):  # an export's own-folder paths set to where it lies now
        return local_dir.model_cfg(local_dir.folder_of(name))
    return open_clip.get_model_config(name) or {}


def _check_offline(name: str, model_cfg: dict[str, Any]) -> None:
    text = model_cfg.get("text_cfg", {})
    if name.startswith("local-dir:"):  # open_clip reads the tokenizer from the folder, not the text model
        ref = text.get("hf_model_name")
        if ref and not (Path(ref) / "config.json").is_file():
            raise ModelSpecError(
                f"open_clip:{name}: text_cfg.hf_model_name '{ref}' in its open_clip_config.json is not a "
                "folder with a config.json (an export from before clipkit marked its folder paths, since "
                "moved?); nothing is downloaded: export it again, or set hf_model_name to the folder that "
                "holds the text model's config.json"
            )
        return
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


@model_spec(
    "open_clip",
    "'open_clip:<config>[@<weights file>]' (config: a name, a JSON file or local-dir:<dir>)",
    prefix="open_clip:",
)
def load_open_clip(spec: str, overrides: list[str]) -> EvalModel:
    import open_clip

    config, _, weights = spec.removeprefix("open_clip:").partition("@")
    if not config:
        raise ModelSpecError(f"'{spec}': no open_clip config; expected open_clip:<config>[@<weights file>]")
    name = _open_clip_name(config)
    if weights and name.startswith("local-dir:"):
        raise ModelSpecError(f"'{spec}': a local-dir: model carries its own weights; drop '@{weights}'")
    if weights and not Path(weights).is_file():
        raise ModelSpecError(f"'{spec}': weights file '{weights}' not found")
    model_cfg = _model_cfg(name)
    _check_offline(name, model_cfg)
    try:
        # No tower-level hub or package weights: a spec without @weights is a random model.
        clip, _, transform = open_clip.create_model_and_transforms(
            name,
            pretrained=weights or None,
            pretrained_image=False,
            pretrained_text=False,
            **local_dir.open_clip_kwargs(name),  # a moved export: its text model config where it is now
        )
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        if weights or name.startswith("local-dir:"):
            raise _weights_error(name, weights or name, err) from err
        raise
    model = OpenClipModel(clip.eval(), transform, open_clip.get_tokenizer(name), model_cfg)
    model.spec, model.pretrained = spec, weights or name
    model.name = name.removeprefix("local-dir:")
    if name.startswith("local-dir:"):
        where = f"local-dir:{Path(name.removeprefix('local-dir:')).resolve()}"
    else:
        where = str(Path(config).resolve()) if config.endswith(".json") else name
    model.resolved = f"open_clip:{where}" + (f"@{Path(weights).resolve()}" if weights else "")
    return model


# ----------------------------------------------------------------------------- Hugging Face


@model_spec("hf_clip", "'hf-clip:<local Hugging Face CLIP/SigLIP folder>'", prefix="hf-clip:")
def load_hf_clip(spec: str, overrides: list[str]) -> EvalModel:
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
