"""open_clip ``local-dir:`` folders read from wherever they lie now (relocatable exports).

open_clip's ``local-dir:<folder>`` reads ``open_clip_config.json`` and the weights from the
folder, and the tokenizer too (``get_tokenizer`` ignores ``hf_tokenizer_name``'s value), but
it hands ``text_cfg.hf_model_name`` to ``transformers.AutoConfig.from_pretrained`` as it is:
a path relative to the *current directory*, never to the folder. An export with a Hugging
Face text tower keeps that tower's config in the folder itself, so the folder's absolute path
is what open_clip needs there, and a copied or moved folder names a path that is gone
(transformers then reads it as a hub id: "Repo id must be in the form ...").

``clipkit export`` therefore also writes, beside ``model_cfg``, which ``text_cfg`` keys name
the folder itself::

    "clipkit_export": {"name": "<name>", "folder_keys": ["hf_model_name", "hf_tokenizer_name"]}

open_clip ignores that key. clipkit's loaders set those keys to the folder's current path
(``model_cfg`` / ``open_clip_kwargs``), so ``open_clip:local-dir:<copy>`` loads anywhere.
For open_clip alone, ``relink`` rewrites the keys in the folder's JSON files to where the
folder is now, or a caller passes the fixed ``text_cfg`` itself (the README's snippet).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clipkit.data.atomic import atomic_write_text

EXPORT_KEY = "clipkit_export"  # top-level key of open_clip_config.json that clipkit export writes
CONFIG_FILE = "open_clip_config.json"
FOLDER_KEY_CANDIDATES = ("hf_model_name", "hf_tokenizer_name")  # text_cfg keys that may name a folder


def folder_of(name: str) -> Path:
    """The folder of an open_clip name ``local-dir:<folder>``."""
    return Path(name.removeprefix("local-dir:"))


def read_config(folder: Path) -> dict[str, Any]:
    """The folder's ``open_clip_config.json``: ``{"model_cfg", "preprocess_cfg"[, EXPORT_KEY]}``."""
    return json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))


def folder_keys(text_cfg: dict[str, Any], folder: Path) -> list[str]:
    """The ``text_cfg`` keys whose value is ``folder`` itself (its path, or ``.``), in the order of
    ``FOLDER_KEY_CANDIDATES``: what an export marks as "this folder, wherever it is"."""
    here = folder.resolve()
    return [
        k
        for k in FOLDER_KEY_CANDIDATES
        if text_cfg.get(k) and (text_cfg[k] == "." or Path(text_cfg[k]).resolve() == here)
    ]


def relocated_text_cfg(folder: Path, data: dict[str, Any]) -> dict[str, Any]:
    """``data``'s ``text_cfg`` with the keys the export marked set to ``folder``'s current path."""
    text = dict(data["model_cfg"].get("text_cfg", {}))
    for key in data.get(EXPORT_KEY, {}).get("folder_keys", []):
        text[key] = str(folder.resolve())
    return text


def model_cfg(folder: Path) -> dict[str, Any]:
    """The folder's model config, relocated (``relocated_text_cfg``)."""
    data = read_config(folder)
    cfg = dict(data["model_cfg"])
    if "text_cfg" in cfg:
        cfg["text_cfg"] = relocated_text_cfg(folder, data)
    return cfg


def open_clip_kwargs(name: str, context_length: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``open_clip.create_model[_and_transforms](name, ...)`` that make a
    moved clipkit export load: ``{"text_cfg": <relocated>}``, or ``{}`` when nothing needs it.

    open_clip applies a ``text_cfg`` keyword after its own edits of the config, so the two it
    makes are repeated here: ``force_context_length`` (pass it as ``context_length``) and
    ``hf_model_pretrained=False`` (the folder's weights file holds the text tower; clipkit
    never asks for open_clip's per-tower pretrained weights).
    """
    if not name.startswith("local-dir:"):
        return {}
    folder = folder_of(name)
    data = read_config(folder)
    if "hf_model_name" not in data.get(EXPORT_KEY, {}).get("folder_keys", []):
        return {}  # open_clip reads the tokenizer from the folder; only the text model's path matters
    text = relocated_text_cfg(folder, data)
    text["hf_model_pretrained"] = False
    if context_length is not None:
        text["context_length"] = context_length
    return {"text_cfg": text}


def relink(folder: str | Path) -> list[Path]:
    """Point the folder's JSON files (``open_clip_config.json`` and the export's ``<name>.json``)
    at where the folder lies now, so plain open_clip and tools built on it (CLIP_benchmark) load a
    copied or moved export. Returns the files rewritten (atomically); a folder whose config names
    no folder keys needs nothing."""
    folder = Path(folder)
    data = read_config(folder)
    marker = data.get(EXPORT_KEY, {})
    if not marker.get("folder_keys"):
        return []
    text = relocated_text_cfg(folder, data)
    data["model_cfg"]["text_cfg"] = text
    atomic_write_text(folder / CONFIG_FILE, json.dumps(data, indent=1))
    written = [folder / CONFIG_FILE]
    named = folder / f"{marker.get('name', '')}.json"
    if marker.get("name") and named.is_file():
        cfg = json.loads(named.read_text(encoding="utf-8"))
        cfg["text_cfg"] = {**cfg.get("text_cfg", {}), **{k: text[k] for k in marker["folder_keys"]}}
        atomic_write_text(named, json.dumps(cfg, indent=1))
        written.append(named)
    return written
