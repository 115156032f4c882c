"""Embed a collection with a DualEncoder into the layout of ``clipkit.index.store``.

Batched, resumable and rank-aware: the input is cut into parts (``clipkit.index.sources``);
rank ``r`` of ``w`` embeds parts ``r, r + w, ...``; a part whose files are all written is
skipped, so a killed run continues where it stopped. Each part is written atomically, metadata
before vectors before the done-marker. Vectors are L2-normalised and stored as float16 by
default (half the disk; ~1e-3 relative error, far below what retrieval notices) or float32.

    model's side: image_transform(train=False), encode_image(image=...), tokenize, encode_text
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipkit.data.decode import SampleError, decode_image
from clipkit.data.pipeline import draft_size_of
from clipkit.errors import ClipkitError
from clipkit.index.sources import PartSpec, Sample, Source
from clipkit.index.store import CONFIG_FILE, META_COLUMNS, part_done, part_name, write_json, write_part
from clipkit.models.embed import encode_images, encode_texts, eval_mode, model_device

DTYPES = {"float16": np.float16, "float32": np.float32}


class EmbedError(ClipkitError, ValueError):
    """A bad sample with --on-error raise, or an output folder holding another export."""


def embed_images(model: Any, images: list[Any]) -> np.ndarray:
    """PIL images -> (B, D) float32 L2-normalised embeddings (the model's eval transform)."""
    transform = model.image_transform(False)
    with eval_mode(model):
        x = torch.stack([transform(im) for im in images])  # (B, 3, H, W)
        return encode_images(model, x, model_device(model)).float().cpu().numpy()


def embed_texts(model: Any, texts: list[str]) -> np.ndarray:
    """Strings -> (B, D) float32 L2-normalised embeddings."""
    with eval_mode(model):
        return encode_texts(model, texts, model_device(model)).float().cpu().numpy()


def _check_config(out: Path, config: dict[str, Any]) -> None:
    path = out / CONFIG_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old != config:
            diff = ", ".join(
                f"{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in config if old.get(k) != config.get(k)
            )
            raise EmbedError(
                f"{out} holds an export made with other settings ({diff}); resume with the same "
                "arguments, or write to a new --out folder"
            )
    else:
        write_json(path, config)


def check_options(modality: str, batch_size: int, dtype: str, on_error: str) -> None:
    if modality not in ("image", "text") or dtype not in DTYPES or on_error not in ("skip", "raise"):
        raise EmbedError(f"bad option: modality={modality!r}, dtype={dtype!r}, on_error={on_error!r}")
    if batch_size < 1:
        raise EmbedError(f"batch size must be >= 1, got {batch_size}")


def start_export(
    out: Path,
    source: Source,
    n_parts: int,
    model_name: str,
    model_overrides: list[str] | None,
    modality: str,
    dtype: str,
    dim: int,
) -> dict[str, Any]:
    """Create ``out`` and write its ``embed_config.json`` (or check it against a resumed export's)."""
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "model": model_name,
        "model_overrides": list(model_overrides or []),
        "modality": modality,
        "dtype": dtype,
        "dim": int(dim),
        "inputs": source.describe(),
        "n_parts": n_parts,
    }
    _check_config(out, config)
    return config


def embed_collection(
    model: Any,
    source: Source,
    out_dir: str | Path,
    *,
    model_name: str,
    model_overrides: list[str] | None = None,
    modality: str = "image",
    batch_size: int = 64,
    dtype: str = "float16",
    on_error: str = "skip",
    rank: int = 0,
    world_size: int = 1,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], list[str]]:
    """Embed this rank's parts; returns (config, all part names) for ``store.finish``."""
    check_options(modality, batch_size, dtype, on_error)
    out = Path(out_dir)
    specs = source.parts()
    dim = embed_texts(model, ["probe"]).shape[1]
    config = start_export(out, source, len(specs), model_name, model_overrides, modality, dtype, dim)
    names = [part_name(i) for i in range(len(specs))]
    embedder = PartEmbedder(model, source, modality, batch_size, on_error, dim)
    for i in range(rank, len(specs), world_size):
        if part_done(out, names[i]) is not None:
            log(f"part {i + 1}/{len(specs)} already done, skipped")
            continue
        log(part_line(i, specs, embed_part(embedder, out, names[i], specs[i], dtype)))
    return config, names


def embed_part(embedder: PartEmbedder, out: Path, name: str, spec: PartSpec, dtype: str) -> dict[str, Any]:
    """Embed one part and write it (``store.write_part``: atomic, marker last); returns the marker."""
    t0 = time.perf_counter()
    vectors, meta, skipped = embedder.run(spec)
    marker = {"rows": len(vectors), "skipped": skipped, "seconds": time.perf_counter() - t0}
    write_part(out, name, vectors.astype(DTYPES[dtype]), meta, skipped, marker["seconds"])
    return marker


def part_line(i: int, specs: list[PartSpec], marker: dict[str, Any]) -> str:
    """The log line of a written part."""
    skipped = marker["skipped"]
    bad = f", skipped {sum(skipped.values())} ({dict(skipped)})" if skipped else ""
    return (
        f"part {i + 1}/{len(specs)} ({specs[i].shard}): {marker['rows']} rows{bad}, {marker['seconds']:.1f} s"
    )


class PartEmbedder:
    """Embeds one part (``run``) with a loaded model: every engine's unit of work."""

    def __init__(self, model: Any, source: Source, modality: str, batch_size: int, on_error: str, dim: int):
        self.model, self.source, self.modality = model, source, modality
        self.batch_size, self.on_error, self.dim = batch_size, on_error, dim
        self.transform = model.image_transform(False) if modality == "image" else None
        self.draft = draft_size_of(self.transform) if self.transform is not None else None

    def _prepare(self, s: Sample) -> Any:
        if s.error is not None:
            raise s.error
        if self.modality == "text":
            if not s.caption:
                raise SampleError("empty_caption", "no caption to embed")
            return s.caption
        return self.transform(decode_image(s.image, draft_size=self.draft))  # (3, H, W)

    def _encode(self, inputs: list[Any]) -> np.ndarray:
        with eval_mode(self.model):
            if self.modality == "text":
                emb = encode_texts(self.model, inputs, model_device(self.model))
            else:
                emb = encode_images(self.model, torch.stack(inputs), model_device(self.model))
        return emb.float().cpu().numpy()  # (B, D)

    def run(self, spec: PartSpec) -> tuple[np.ndarray, dict[str, list], dict[str, int]]:
        skipped: Counter[str] = Counter()
        meta: dict[str, list] = {c: [] for c in META_COLUMNS}
        chunks, pending = [], []
        for s in self.source.read_part(spec, images=self.modality == "image"):
            try:
                pending.append(self._prepare(s))
            except SampleError as e:
                if self.on_error == "raise":
                    raise EmbedError(
                        f"{spec.shard}: sample '{s.key}' at offset {s.offset}: {e}; "
                        "pass --on-error skip to skip (and count) such samples"
                    ) from None
                skipped[e.kind] += 1
                continue
            for c in META_COLUMNS:
                meta[c].append(getattr(s, c))
            if len(pending) == self.batch_size:
                chunks.append(self._encode(pending))
                pending = []
        if pending:
            chunks.append(self._encode(pending))
        vectors = np.concatenate(chunks) if chunks else np.zeros((0, self.dim), np.float32)
        return vectors, meta, dict(skipped)
