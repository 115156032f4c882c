"""Projection heads from a tower's width to the shared embedding width: ``PROJECTIONS``."""

from __future__ import annotations

from torch import nn

from clipkit.registry import Registry

PROJECTIONS = Registry("projection")


@PROJECTIONS.register("linear")
def linear(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim, bias=False)


@PROJECTIONS.register("mlp")
def mlp(in_dim: int, out_dim: int) -> nn.Module:
    # Hidden width 2 * out_dim, as open_clip's "mlp" projection head for timm towers.
    return nn.Sequential(nn.Linear(in_dim, 2 * out_dim), nn.GELU(), nn.Linear(2 * out_dim, out_dim))


@PROJECTIONS.register("none")
def identity(in_dim: int, out_dim: int) -> nn.Module:
    if in_dim != out_dim:
        raise ValueError(
            f"projection 'none' keeps the tower's width ({in_dim}) but embed_dim is {out_dim}; "
            f"set model.embed_dim={in_dim} or use model.projection=linear"
        )
    return nn.Identity()


def build_projection(kind: str, in_dim: int, out_dim: int, tower: str = "") -> nn.Module:
    """``kind`` in PROJECTIONS; ``tower`` names the tower in error messages."""
    try:
        return PROJECTIONS.build(kind, in_dim=in_dim, out_dim=out_dim)
    except ValueError as e:
        raise ValueError(f"{tower}: {e}" if tower else str(e)) from None
