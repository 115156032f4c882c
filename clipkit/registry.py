"""Named components: ``@LOSSES.register("clip") class ClipLoss`` then ``LOSSES.build("clip", **kw)``.

A registry fails loudly on unknown names and unknown keyword arguments, suggesting the
nearest valid name, so a typo in a recipe stops the run before any work starts.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from clipkit.errors import ClipkitError


class UnknownNameError(ClipkitError, KeyError):
    """A registry lookup of a name that is not registered."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class UnknownOptionError(ClipkitError, TypeError):
    """A keyword argument that the registered component does not take."""


def suggest(name: str, known: list[str]) -> str:
    """' did you mean 'x'?' for the closest known name, or ''."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" did you mean '{close[0]}'?" if close else ""


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            obj.registry_name = name  # type: ignore[attr-defined]
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._items:
            raise UnknownNameError(
                f"unknown {self.kind} '{name}';{suggest(name, self.names())} known: {', '.join(self.names())}"
            )
        return self._items[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        obj = self.get(name)
        check_kwargs(obj, kwargs, f"{self.kind} '{name}'")
        return obj(**kwargs)


def check_kwargs(obj: Callable[..., Any], kwargs: dict[str, Any], what: str) -> None:
    """Raise a clear error for keyword arguments that ``obj`` does not accept."""
    sig = inspect.signature(obj)
    params = sig.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    allowed = [n for n, p in params.items() if n != "self" and p.kind is not p.VAR_POSITIONAL]
    for key in kwargs:
        if key not in allowed:
            raise UnknownOptionError(
                f"{what} has no option '{key}';{suggest(key, allowed)} "
                f"options: {', '.join(allowed) or '(none)'}"
            )
