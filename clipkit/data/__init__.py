"""Shards in, batch dicts out: building, inspecting, validating and filtering shards, and the loader.

    from clipkit.data import ShardWriter, build_loader, SkipStats
    from clipkit.data import build_shards, BuildOptions, open_source      # clipkit data build
    from clipkit.data import inspect_shards, validate_shards, filter_shards

The loader (torch) and the tools are imported on first use, so shard builders and
``atomic_write_*`` callers do not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from clipkit.data.atomic import atomic_open, atomic_write_bytes, atomic_write_text
from clipkit.data.decode import SampleError, decode_caption, decode_image
from clipkit.data.shards import ShardWriter, read_sizes
from clipkit.data.stats import SkipStats
from clipkit.data.urls import ShardSpecError, dataset_size, expand_urls

_LAZY = {
    "build_loader": "clipkit.data.pipeline",
    "DataError": "clipkit.data.pipeline",
    "BuildOptions": "clipkit.data.build",
    "build_shards": "clipkit.data.build",
    "open_source": "clipkit.data.sources",
    "inspect_shards": "clipkit.data.inspect",
    "validate_shards": "clipkit.data.validate",
    "FilterOptions": "clipkit.data.filters",
    "filter_shards": "clipkit.data.filters",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clipkit.data' has no attribute '{name}'")


__all__ = [
    "BuildOptions",
    "DataError",
    "FilterOptions",
    "SampleError",
    "ShardSpecError",
    "ShardWriter",
    "SkipStats",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "build_loader",
    "build_shards",
    "dataset_size",
    "decode_caption",
    "decode_image",
    "expand_urls",
    "filter_shards",
    "inspect_shards",
    "open_source",
    "read_sizes",
    "validate_shards",
]
