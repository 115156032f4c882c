"""Tower factory: ``build_tower(cfg, modality)`` resolves ``"<prefix>:<arch>"`` in ``TOWERS``.

Prefixes: ``timm`` (image, ``towers_timm.py``), ``hf`` (text, ``towers_hf.py``),
``open_clip`` (either, ``towers_openclip.py``) and ``hf-clip`` (either half of a Hugging Face
CLIP / SigLIP model, ``towers_hf_clip.py``). A new backbone family is a new module with a
``@TOWERS.register("<prefix>")`` Tower subclass taking ``(arch, cfg, modality, shared)``.
"""

from __future__ import annotations

from typing import Any

from clipkit.config import TowerConfig
from clipkit.models import towers_hf, towers_hf_clip, towers_openclip, towers_timm  # noqa: F401  (register prefixes)
from clipkit.models.tower_base import TOWERS, LayerGroup, Tower

__all__ = ["TOWERS", "LayerGroup", "Tower", "build_tower", "build_towers"]

MODALITIES = ("vision", "text")


def build_tower(cfg: TowerConfig, modality: str, shared: dict[str, Any] | None = None) -> Tower:
    """Build the tower ``cfg.name`` for ``modality`` ("vision" or "text") and lock it if asked.

    ``shared`` is a dict passed to both towers of one model, for backbones that serve both
    (see ``build_towers``).
    """
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got '{modality}'")
    prefix, sep, arch = cfg.name.partition(":")
    if not sep or not arch:
        raise ValueError(
            f"{modality} tower name '{cfg.name}' must look like '<prefix>:<arch>' "
            f"(e.g. 'timm:tf_efficientnet_lite0', 'hf:minilm', 'open_clip:ViT-B-32'); "
            f"prefixes: {', '.join(TOWERS.names())}"
        )
    if cfg.unlocked_layers and not cfg.locked:
        raise ValueError(
            f"{modality} tower: unlocked_layers={cfg.unlocked_layers} only applies with locked=true"
        )
    if cfg.pool_grid < 1:
        raise ValueError(f"{modality} tower: pool_grid must be >= 1, got {cfg.pool_grid}")
    if cfg.pool_grid != 1 and not getattr(TOWERS.get(prefix), "supports_pool_grid", False):
        raise ValueError(
            f"{modality} tower '{cfg.name}': pool_grid={cfg.pool_grid} pools a CNN's last feature map "
            f"over a grid; only timm image towers have one. Leave pool_grid at 1 for this tower"
        )
    tower = TOWERS.build(prefix, arch=arch, cfg=cfg, modality=modality, shared=shared)
    if cfg.locked:
        tower.lock(cfg.unlocked_layers)
    return tower


def build_towers(vision: TowerConfig, text: TowerConfig) -> tuple[Tower, Tower]:
    """Both towers of one model; two halves of the same open_clip or hf-clip model are built once."""
    shared: dict[str, Any] = {}
    if vision.name == text.name and vision.weights == text.weights and vision.name.startswith("open_clip:"):
        shared["open_clip_sizes"] = (vision.image_size, text.context_length)
    return build_tower(vision, "vision", shared), build_tower(text, "text", shared)
