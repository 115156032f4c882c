"""The seeded shuffle buffer: a permutation, a function of its rng alone, resumable mid-stream."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from clipkit.data.shuffle import ShuffleBuffer, rng_state, seeded_rng, set_rng_state, shuffle_buffer


def test_output_is_a_seeded_permutation_of_the_input():
    out = list(shuffle_buffer(range(200), 16, random.Random(0)))
    assert sorted(out) == list(range(200)) and out != list(range(200))
    assert list(shuffle_buffer(range(200), 16, random.Random(0))) == out
    assert list(shuffle_buffer(range(200), 16, random.Random(1))) != out
    short = list(shuffle_buffer(range(5), 16, random.Random(0)))  # fewer items than the buffer holds
    assert sorted(short) == list(range(5))


def test_the_buffer_mixes_only_within_its_size():
    # Reservoir: output i is emitted as input size + i arrives and is one of the inputs before it.
    out = list(shuffle_buffer(range(100), 8, random.Random(3)))
    assert all(x < 8 + i for i, x in enumerate(out))
    assert max(x - i for i, x in enumerate(out)) == 7  # and is reached: no item leaves sooner


class Counting:
    """An input iterator that counts what the buffer has taken from it."""

    def __init__(self, items: list[int]):
        self.items, self.taken = items, 0

    def __iter__(self):
        while self.taken < len(self.items):
            self.taken += 1
            yield self.items[self.taken - 1]


@pytest.mark.parametrize("cut", [0, 1, 7, 40, 92, 95, 99])  # before, inside and while draining
def test_a_captured_state_restored_mid_stream_yields_the_identical_rest(cut):
    items = list(range(100))
    whole = list(shuffle_buffer(items, 8, seeded_rng(1, 0, "samples")))
    source = Counting(items)
    buffer = ShuffleBuffer(8, seeded_rng(1, 0, "samples"))
    stream = buffer(source)
    head = [next(stream) for _ in range(cut)]
    state = json.loads(json.dumps(buffer.state_dict()))  # plain data, as in a checkpoint
    # A fresh buffer with another rng: everything that matters comes from the state.
    again = ShuffleBuffer(8, random.Random("unrelated"))
    again.load_state_dict(state)
    rest = list(again(items[source.taken :]))
    assert head + rest == whole


def test_state_names_held_items_by_reference_and_takes_them_back():
    buffer = ShuffleBuffer(4, random.Random(0))
    items = [{"n": i} for i in range(10)]
    stream = buffer(iter(items))
    head = [next(stream) for _ in range(3)]
    state = buffer.state_dict(ref=lambda item: item["n"])
    assert sorted(state["held"]) == sorted(x["n"] for x in items[:7] if x not in head)
    again = ShuffleBuffer(4, random.Random(1))
    again.load_state_dict(state, [items[n] for n in state["held"]])
    assert head + list(again(iter(items[7:]))) == list(shuffle_buffer(items, 4, random.Random(0)))


def test_rng_state_round_trips_as_plain_lists():
    rng = random.Random(5)
    rng.random()
    state = rng_state(rng)
    assert json.loads(json.dumps(state)) == state
    want = [rng.random() for _ in range(3)]
    other = random.Random(0)
    set_rng_state(other, json.loads(json.dumps(state)))
    assert [other.random() for _ in range(3)] == want


def test_seeded_rng_is_stable_across_processes():
    code = "from clipkit.data.shuffle import seeded_rng; print(seeded_rng(7, 2, 'shards').getrandbits(64))"
    values = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": h},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for h in ("0", "1")
    }
    assert values == {str(seeded_rng(7, 2, "shards").getrandbits(64))}
    assert seeded_rng(7, 2, "shards").random() != seeded_rng(7, 3, "shards").random()
