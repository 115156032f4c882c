"""Towers, projection heads and the DualEncoder (see clipkit/ARCHITECTURE.md)."""

from clipkit.models.dual_encoder import DualEncoder, build_model
from clipkit.models.projection import PROJECTIONS, build_projection
from clipkit.models.towers import TOWERS, Tower, build_tower, build_towers

__all__ = [
    "PROJECTIONS",
    "TOWERS",
    "DualEncoder",
    "Tower",
    "build_model",
    "build_projection",
    "build_tower",
    "build_towers",
]
