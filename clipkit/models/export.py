"""Export any model spec as an open_clip model, so any open_clip-based tool can evaluate it.

``export_open_clip(spec, out)`` loads ``spec`` through ``clipkit.models.specs`` and writes::

    <out>/open_clip_config.json      {"model_cfg": ..., "preprocess_cfg": ..., "clipkit_export": ...}
                                     (open_clip's local-dir layout; the last key: ``local_dir``)
    <out>/open_clip_model.safetensors the weights, in open_clip's parameter names
    <out>/<name>.json                the bare model config, for open_clip.add_model_config
    <out>/config.json, tokenizer*     an hf text tower's config and tokenizer (not its weights)
    <out>/README.md                  how to load it

and then loads it back with open_clip and checks that it preprocesses, tokenizes and embeds
images and texts as the loaded model does. Load it with either of::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:<out>")
    open_clip.add_model_config("<out>/<name>.json")
    model, _, preprocess = open_clip.create_model_and_transforms(
        "<name>", pretrained="<out>/open_clip_model.safetensors", image_mean=..., image_std=...)

The folder is relocatable: clipkit (``open_clip:local-dir:<copy>``) loads a copy anywhere. An
hf text tower's config lies in the folder, and open_clip reads ``text_cfg.hf_model_name`` as a
path from the current directory, so the config names the folder's absolute path; open_clip
alone loads a moved copy after ``clipkit.models.local_dir.relink(<copy>)``, or with the
``text_cfg`` keyword the folder's README.md shows (``clipkit.models.local_dir`` says why).

By spec kind:

- a clipkit ``DualEncoder`` (run folder, checkpoint, recipe, or a ``module:function`` factory
  returning one): the mappings below;
- ``open_clip:``: the loaded model's own config, preprocessing and weights;
- ``hf-clip:``: a ``CLIPModel`` / ``SiglipModel`` converted by ``clipkit.models.convert_hf``;
- anything else (a factory returning another kind of object) has no open_clip form and is
  refused with the reason.

DualEncoder mappings (clipkit -> open_clip):

- ``timm:<arch>`` vision + linear projection -> ``vision_cfg.timm_model_name`` with
  ``timm_pool`` = the trunk's pooling and ``timm_proj: linear`` (``vision.model.*`` ->
  ``visual.trunk.*``, ``vision_proj.weight`` -> ``visual.head.proj.weight``);
- ``hf:<dir>`` text + linear projection -> ``text_cfg.hf_model_name`` (a copy of the folder's
  config and tokenizer) with ``hf_pooler_type: mean_pooler`` and ``hf_proj_type: linear``
  (``text.model.*`` -> ``text.transformer.*``, ``text_proj.weight`` -> ``text.proj.weight``).
  open_clip masks mean pooling with ``tokens != config.pad_token_id``, clipkit with the
  tokenizer's pad id; the copied config is given the tokenizer's pad id so both agree;
- ``open_clip:<config>`` on both sides with ``projection: none`` -> that config, with the run's
  image size and context length, and the underlying open_clip weights unchanged; a Hugging Face
  tokenizer (and text model config) the config names is copied into the folder;
- ``hf-clip:<dir>`` on both sides with ``projection: none`` (``model.init=hf-clip:<dir>``) -> the
  run's weights put back into the Hugging Face model, then converted as an ``hf-clip:`` spec is.

Other combinations (an ``mlp`` projection, whose open_clip text form has another shape;
mixed families) are refused with the reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from clipkit.data.atomic import atomic_write_bytes, atomic_write_text
from clipkit.errors import ClipkitError
from clipkit.models import local_dir
from clipkit.models.adapters import EvalModel, HFClipModel, OpenClipModel
from clipkit.models.specs import dual_encoder_of, load_model, safe_name, spec_kind

HF_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


class ExportError(ClipkitError):
    """A model that cannot be written as an open_clip model."""


def _prefixed(sd: dict[str, Tensor], old: str, new: str) -> dict[str, Tensor]:
    return {new + k[len(old) :]: v for k, v in sd.items() if k.startswith(old)}


def _projection(model: nn.Module) -> str:
    """The ``model.projection`` a DualEncoder was built with, read from its heads."""
    head = model.text_proj
    return "none" if isinstance(head, nn.Identity) else "linear" if isinstance(head, nn.Linear) else "mlp"


def _timm_pool(trunk: nn.Module) -> str:
    pool = getattr(trunk, "global_pool", "avg")
    return str(getattr(pool, "pool_type", pool) or "avg")


def _copy_hf_dir(src: Path, dst: Path, pad_id: int) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in HF_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    cfg["pad_token_id"] = pad_id  # open_clip's mean-pooling mask reads it from here
    atomic_write_text(dst / "config.json", json.dumps(cfg, indent=1))
    return dst.resolve()


def _timm_hf_mapping(model: nn.Module, out: Path) -> tuple[dict, dict, dict[str, Tensor]]:
    from clipkit.models.towers_hf import resolve_hf_dir

    vision, text, projection = model.vision, model.text, _projection(model)
    if vision.pool_grid != 1:
        raise ExportError(
            f"model.vision.pool_grid={vision.pool_grid} has no open_clip equivalent (open_clip's timm "
            "towers pool globally, by average or attention); only pool_grid=1 exports"
        )
    if projection != "linear":
        raise ExportError(
            f"projection '{projection}' has no open_clip equivalent for an hf text tower "
            "(open_clip's hf 'mlp' head has no biases and another width); only 'linear' exports"
        )
    # The export folder doubles as the text tower's HF folder: open_clip's local-dir loader
    # reads the tokenizer from the model folder itself.
    hf_dir = _copy_hf_dir(resolve_hf_dir(text.spec.removeprefix("hf:")), out, text.pad_token_id)
    model_cfg = {
        "embed_dim": model.embed_dim,
        "vision_cfg": {
            "timm_model_name": vision.spec.removeprefix("timm:"),
            "timm_model_pretrained": False,
            "timm_pool": _timm_pool(vision.model),
            "timm_proj": "linear",
            "timm_proj_bias": False,
            "image_size": vision.image_size,
        },
        "text_cfg": {
            "hf_model_name": str(hf_dir),
            "hf_tokenizer_name": str(hf_dir),
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear",
            "context_length": text.tokenizer.context_length,
        },
    }
    preprocess = {
        "size": vision.image_size,
        "mean": list(vision.mean),
        "std": list(vision.std),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    sd = model.state_dict()
    state = {
        **_prefixed(sd, "vision.model.", "visual.trunk."),
        "visual.head.proj.weight": sd["vision_proj.weight"],
        **_prefixed(sd, "text.model.", "text.transformer."),
        "text.proj.weight": sd["text_proj.weight"],
    }
    return model_cfg, preprocess, state


def _open_clip_mapping(model: nn.Module, out: Path) -> tuple[dict, dict, dict[str, Tensor]]:
    import copy

    from clipkit.models.towers_openclip import resolve_config

    arch = model.vision.spec.removeprefix("open_clip:")
    if model.text.spec != model.vision.spec or _projection(model) != "none":
        raise ExportError(
            "an open_clip model exports when both towers are the same open_clip config with "
            f"projection 'none'; this one has {model.vision.spec} / {model.text.spec}, projection "
            f"'{_projection(model)}'"
        )
    model_cfg = copy.deepcopy(resolve_config(arch)[1])
    size = model.vision.preprocess["size"]  # open_clip's visual.image_size: int or (H, W)
    model_cfg["vision_cfg"]["image_size"] = size if isinstance(size, int) or len(set(size)) > 1 else size[0]
    model_cfg["text_cfg"]["context_length"] = model.text.tokenizer.context_length
    _hf_text_files(model_cfg["text_cfg"], model.text.tokenizer, out)
    sd = model.state_dict()
    state = _prefixed(sd, "vision.model.", "visual.")
    if hasattr(model.text.model, "transformer") and type(model.text.model).__name__ == "ClipText":
        state.update(_prefixed(sd, "text.model.", ""))  # CLIP keeps its text tower at the root
    else:
        state.update(_prefixed(sd, "text.model.", "text."))
    return model_cfg, dict(model.vision.preprocess), state


def _hf_text_files(text_cfg: dict[str, Any], tokenizer: Any, out: Path) -> None:
    """Make an open_clip config's Hugging Face parts load from the export folder ``out``: its
    tokenizer (open_clip's local-dir: loader reads it from the folder when ``hf_tokenizer_name`` is
    set) and its text model's config (``hf_model_name``), copied there."""
    if text_cfg.get("hf_model_name"):
        src = Path(text_cfg["hf_model_name"])
        pad = json.loads((src / "config.json").read_text(encoding="utf-8")).get("pad_token_id")
        text_cfg["hf_model_name"] = str(_copy_hf_dir(src, out, pad))
    if text_cfg.get("hf_tokenizer_name"):
        tokenizer.tokenizer.save_pretrained(str(out))  # open_clip's HFTokenizer wraps the HF one
        text_cfg["hf_tokenizer_name"] = "."  # non-empty: local-dir: reads the tokenizer from the folder


def _hf_clip_mapping(model: nn.Module, out: Path) -> tuple[dict, dict, dict[str, Tensor]]:
    from clipkit.models.convert_hf import HFConversionError, hf_to_open_clip, save_hf_tokenizer
    from clipkit.models.towers_hf_clip import hf_model_of

    if model.text.spec != model.vision.spec or _projection(model) != "none":
        raise ExportError(
            "an hf-clip model exports when both towers are the same hf-clip folder with projection "
            f"'none'; this one has {model.vision.spec} / {model.text.spec}, projection '{_projection(model)}'"
        )
    hf, processor, tokenizer = hf_model_of(model)  # the run's weights in the Hugging Face model
    try:
        converted = hf_to_open_clip(hf, processor)
    except HFConversionError as err:
        raise ExportError(
            f"this model's Hugging Face {type(hf).__name__} has no open_clip form ({err}); clipkit "
            "evaluates and indexes it as it is (--model <run folder>)"
        ) from err
    save_hf_tokenizer(tokenizer, out)
    return converted


def _pixel_tolerance(model: EvalModel, preprocess_cfg: dict[str, Any]) -> float:
    """0 (exact) but for a Hugging Face image processor (an hf-clip: model, or a DualEncoder with an
    hf-clip vision tower): it resizes in its own code and open_clip through torchvision, so a
    resized pixel may round to the neighbouring intensity level (1/255 before normalisation)."""
    dual = dual_encoder_of(model)
    hf = isinstance(model, HFClipModel) or (dual is not None and dual.vision.spec.startswith("hf-clip:"))
    return 1.001 / 255 / min(preprocess_cfg["std"]) if hf else 0.0


def _check_roundtrip(model: EvalModel, out: Path, atol: float) -> float:
    """Load the export with open_clip; check its preprocessing and tokens are the loaded model's;
    return the max |difference| of image and text embeddings."""
    import open_clip

    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (37, 53, 3), generator=g, dtype=torch.uint8).numpy()
    photo = Image.fromarray(pixels)
    got, want = preprocess(photo), model.image_transform(False)(photo)  # (3, H, W) each
    tol = _pixel_tolerance(model, oc.visual.preprocess_cfg)
    if got.shape != want.shape or (got - want).abs().max().item() > tol:
        raise ExportError("the exported preprocessing does not give the model's image tensors")
    images = torch.randn(2, 3, *oc.visual.image_size, generator=g)  # (2, 3, H, W)
    texts = ["a photo of a cat", "an emoji of a smiling face with sunglasses"]
    with torch.inference_mode():
        tokens = model.tokenize(texts)
        if not torch.equal(tokenizer(texts).long(), tokens.long()):
            raise ExportError("the exported tokenizer does not give the model's tokens")
        diff = max(
            (oc.encode_image(images) - model.encode_image(image=images, normalize=False)).abs().max().item(),
            (oc.encode_text(tokens) - model.encode_text(tokens, normalize=False)).abs().max().item(),
        )
    if diff > atol:
        raise ExportError(f"the exported model's embeddings differ from the model's by {diff:.2e} (> {atol})")
    return diff


def _dual_encoder_form(model: nn.Module, out: Path) -> tuple[dict, dict, dict[str, Tensor]]:
    kinds = (model.vision.spec.split(":")[0], model.text.spec.split(":")[0])
    if kinds == ("timm", "hf"):
        model_cfg, preprocess, state = _timm_hf_mapping(model, out)
    elif kinds == ("open_clip", "open_clip"):
        model_cfg, preprocess, state = _open_clip_mapping(model, out)
    elif kinds == ("hf-clip", "hf-clip"):
        model_cfg, preprocess, state = _hf_clip_mapping(model, out)
    else:
        raise ExportError(
            f"no open_clip form for a {model.vision.spec} image tower with a {model.text.spec} text tower; "
            "exportable: timm + hf towers with linear projections, or one open_clip config or hf-clip "
            "folder on both sides with projection none (what model.init builds)"
        )
    state["logit_scale"] = model.logit_scale.detach().clone()
    if model.logit_bias is not None:
        model_cfg["init_logit_bias"] = float(model.logit_bias.detach())
        state["logit_bias"] = model.logit_bias.detach().clone()
    return model_cfg, preprocess, state


def _open_clip_form(model: OpenClipModel) -> tuple[dict, dict, dict[str, Tensor]]:
    # The model as open_clip built it: its config, its final preprocessing, its own parameter names.
    return dict(model.model_cfg), dict(model.clip.visual.preprocess_cfg), dict(model.clip.state_dict())


def _hf_form(model: HFClipModel, out: Path) -> tuple[dict, dict, dict[str, Tensor]]:
    from clipkit.models.convert_hf import hf_to_open_clip, save_hf_tokenizer

    converted = hf_to_open_clip(model.model, model.processor)
    save_hf_tokenizer(model.tokenizer, out)  # open_clip's local-dir: reads it from the folder
    return converted


def open_clip_form(model: EvalModel, out: Path) -> tuple[dict, dict, dict[str, Tensor]]:
    """(open_clip model config, preprocess config, state dict in open_clip's names) of a loaded
    spec; files the config refers to (an hf tokenizer) are written under ``out``."""
    dual = dual_encoder_of(model)
    if dual is not None:
        return _dual_encoder_form(dual, out)
    if isinstance(model, OpenClipModel):
        return _open_clip_form(model)
    if isinstance(model, HFClipModel):
        return _hf_form(model, out)
    inner = type(getattr(model, "model", model)).__name__
    raise ExportError(
        f"model '{model.spec}' ({spec_kind(model.spec)}) is a {inner}, which has no open_clip form: export "
        "writes open_clip's config and weights, so it needs a clipkit DualEncoder (a run folder, a "
        "checkpoint, a recipe, or a module:function returning a DualEncoder), an open_clip: model or an "
        "hf-clip: model. Evaluate or index this model directly (clipkit eval / clipkit index embed), or "
        "have its factory return a DualEncoder"
    )


def export_open_clip(
    spec: str, out: str | Path, name: str = "", atol: float = 1e-5, check: bool = True
) -> dict[str, Any]:
    """Write the model ``spec`` (any kind of ``clipkit.models.specs``) to ``out`` (module docstring);
    with ``check``, load it back with open_clip and compare embeddings (``max_abs_diff``)."""
    out = Path(out)
    model = load_model(spec)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg, preprocess, state = open_clip_form(model, out)
    from safetensors.torch import save

    default = Path(spec).resolve().name if Path(spec).exists() else safe_name(model.name)
    name = name or f"clipkit-{default}"
    weights = {k: v.detach().contiguous().clone() for k, v in state.items()}
    atomic_write_bytes(out / "open_clip_model.safetensors", save(weights))
    atomic_write_text(out / f"{name}.json", json.dumps(model_cfg, indent=1))
    # Which text_cfg keys name this folder itself: loaders set them to where it lies then.
    keys = local_dir.folder_keys(model_cfg.get("text_cfg", {}), out)
    local = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    local[local_dir.EXPORT_KEY] = {"name": name, "folder_keys": keys}
    atomic_write_text(out / local_dir.CONFIG_FILE, json.dumps(local, indent=1))
    atomic_write_text(
        out / "README.md", _readme(out, name, preprocess, model.resolved, "hf_model_name" in keys)
    )
    diff = _check_roundtrip(model, out, atol) if check else None
    return {"out": out, "name": name, "source": model.resolved, "max_abs_diff": diff, "tensors": len(weights)}


def _readme(out: Path, name: str, pre: dict[str, Any], source: str, hf_text: bool) -> str:
    here = out.resolve()
    moved = (
        f"""
## After copying or moving this folder

The text tower is a Hugging Face model whose `config.json` lies in this folder. open_clip reads
`text_cfg.hf_model_name` as a path from the current directory (never from the folder), so the
config names `{here}`; a copy elsewhere needs one of:

- clipkit, which finds it wherever the folder lies: `clipkit eval ... --model open_clip:local-dir:FOLDER`;
- `python -c "from clipkit.models.local_dir import relink; relink('FOLDER')"` once: the JSON files then
  name the new place, and everything above (and CLIP_benchmark) works again;
- open_clip alone, editing nothing:

```python
import open_clip
text_cfg = open_clip.get_model_config(f"local-dir:{{FOLDER}}")["text_cfg"]
model, _, preprocess = open_clip.create_model_and_transforms(
    f"local-dir:{{FOLDER}}", text_cfg={{**text_cfg, "hf_model_name": FOLDER, "hf_model_pretrained": False}})
tokenizer = open_clip.get_tokenizer(f"local-dir:{{FOLDER}}")
```
"""
        if hf_text
        else "\nThe folder is self-contained: copy or move it anywhere and set FOLDER.\n"
    )
    return f"""# {name}: a model as an open_clip model

Exported by `clipkit export` from `{source}`.

```python
import open_clip

FOLDER = "{here}"  # this folder (where it was written; set it if you moved the folder)

# the whole folder (config, preprocessing and weights):
model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{{FOLDER}}")
tokenizer = open_clip.get_tokenizer(f"local-dir:{{FOLDER}}")

# or by name, with an explicit weights file:
open_clip.add_model_config(f"{{FOLDER}}/{name}.json")
model, _, preprocess = open_clip.create_model_and_transforms(
    "{name}", pretrained=f"{{FOLDER}}/open_clip_model.safetensors",
    image_mean={tuple(pre["mean"])}, image_std={tuple(pre["std"])},
    image_interpolation="{pre.get("interpolation", "bicubic")}")
tokenizer = open_clip.get_tokenizer("{name}")
```

CLIP_benchmark: `clip_benchmark eval --model {name} --pretrained FOLDER/open_clip_model.safetensors ...`
after `open_clip.add_model_config("FOLDER/{name}.json")` in the same process; clipkit: `clipkit eval ...
--model open_clip:local-dir:FOLDER`.
{moved}"""
