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
"""

from __future__ import annotations

from clipkit.registry import Registry

BUILDERS = Registry("data source builder")
