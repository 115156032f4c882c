"""Builders that turn real sources into clipkit shards (run as ``python -m data_tools.<name>``).

Each ``build_<name>.py`` registers its ``build`` in ``clipkit.data.builders.BUILDERS``;
``load_builders()`` imports them all, for ``clipkit data build <name>``. They are not imported
here: ``python -m data_tools.build_emoji`` would then run the module twice (once imported by
the package, once as ``__main__``) and register it twice.
"""

from __future__ import annotations

import importlib
import pkgutil


def load_builders() -> None:
    """Import every ``data_tools.build_*`` module so that its builder is registered."""
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("build_"):
            importlib.import_module(f"{__name__}.{info.name}")
