"""Seeded randomness of the loader: ``seeded_rng`` and the sample shuffle buffer."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def seeded_rng(*parts: Any) -> random.Random:
    """A ``random.Random`` seeded by ``parts`` (e.g. seed, epoch, rank, worker, purpose)."""
    # A str seed is hashed with sha512: stable across processes and PYTHONHASHSEED.
    return random.Random(":".join(str(p) for p in parts))


def rng_state(rng: random.Random) -> list[Any]:
    """``rng.getstate()`` as plain lists (loadable by ``torch.load(weights_only=True)``)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_rng_state(rng: random.Random, state: list[Any]) -> None:
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


class ShuffleBuffer:
    """Reservoir-style shuffle: hold ``size`` items, emit a random one as each new one arrives.

    An object rather than a generator so that its state (``held``, ``draining``, ``rng``) can
    be saved and put back mid-stream: the output order is a function of the rng and the
    input alone. While ``draining`` (the input ended), ``held`` is the rest in reverse.
    """

    def __init__(self, size: int, rng: random.Random):
        self.size, self.rng = size, rng
        self.held: list[Any] = []
        self.draining = False

    def __call__(self, items: Iterable[Any]) -> Iterator[Any]:
        if not self.draining:
            for item in items:
                if len(self.held) < self.size:
                    self.held.append(item)
                    continue
                i = self.rng.randrange(self.size)
                self.held[i], item = item, self.held[i]
                yield item
            self.rng.shuffle(self.held)
            self.held.reverse()  # popped from the end: the shuffled order
            self.draining = True
        while self.held:
            yield self.held.pop()

    def state_dict(self, ref: Callable[[Any], Any] = lambda item: item) -> dict[str, Any]:
        """Plain data: ``{"held": [ref(item), ...], "draining", "rng"}``; ``ref`` names an item
        by something small it can be found again by (the pipeline: its (shard, number))."""
        return {"held": [ref(x) for x in self.held], "draining": self.draining, "rng": rng_state(self.rng)}

    def load_state_dict(self, state: dict[str, Any], held: list[Any] | None = None) -> None:
        """Put a ``state_dict`` back; ``held``: the items its ``"held"`` names, in that order
        (default: the names themselves). Fed the input from where it was, the buffer then
        yields what the captured one would have yielded."""
        set_rng_state(self.rng, state["rng"])
        self.draining = bool(state["draining"])
        self.held = list(state["held"] if held is None else held)


def shuffle_buffer(items: Iterable[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Reservoir-style shuffle of ``items`` (see ``ShuffleBuffer``)."""
    return ShuffleBuffer(size, rng)(items)
