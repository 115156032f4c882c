"""Bundled real sources, by name: ``clipkit data build emoji --out data/emoji``.

A builder is a function ``build(out_dir) -> dict`` (counts, JSON-serialisable) that writes a
source's shards under ``out_dir`` and may be rerun (a complete build is kept). It registers
itself where it is defined::

    @BUILDERS.register("emoji")
    def build(out_dir: str | Path, ...) -> dict[str, int]: ...

The builders are application code in the repository's builder package beside ``clipkit/``
(they read packages the library does not need). Only the CLI imports that package, so
``clipkit data build`` sees every builder and the library never depends on the app. Adding a
source is one registered function in a new ``build_<name>.py`` there.

``run_builder`` runs one with its output folder locked: a second build of the same folder (``make
demo`` beside ``make test``) waits for the first, then finds its complete build and keeps it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from clipkit.data.atomic import folder_lock
from clipkit.registry import Registry

BUILDERS = Registry("data source builder")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_builder(name: str, out_dir: str | Path, **kwargs: Any) -> Any:
    """The builder registered as ``name``, run on ``out_dir`` while no other process writes it."""
    build = BUILDERS.get(name)
    with folder_lock(out_dir, f"clipkit data build {name} --out {out_dir}", wait=True, on_wait=_say):
        return build(out_dir, **kwargs)
