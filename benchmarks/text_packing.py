"""What packing the text tower is worth in a recipe's training loop: packed against padded.

A diagnostic, not a comparison with another tool. It trains ``--recipe`` (the demo's
``train/lit_mix.yaml`` by default) for ``--samples`` samples, in this one process, ``--rounds``
times each way, alternating:

    packed   clipkit as it trains on a CPU: the text tower's per-token work on the real tokens
             (``clipkit.models.packed_hf`` for Hugging Face towers, ``text_padding.packed_block``
             for open_clip's causal text)
    padded   the same run with packing off: Hugging Face's forward on the batch cut to its
             longest caption; open_clip's text in length groups

The weights, data and seeds are the recipe's; both ways compute the same function (the tests in
``tests/test_training_speed.py`` compare them). Printed: each run's training-loop seconds (the
run's own "samples seen in" figure), the median of each way, their ratio and the load average.
Runs go under ``runs/bench/text_packing/`` and are deleted after.

    .venv/bin/python benchmarks/text_packing.py                       # lit_mix, 6,400 samples, 2 rounds
    .venv/bin/python benchmarks/text_packing.py --samples 20000 --rounds 1 --out benchmarks/RESULTS.md --record

Run it alone on a quiet machine; ``--out FILE`` appends the table (a tracked file only with
``--record``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import _record

DONE = re.compile(r"samples seen in ([0-9.]+) s")
WAYS = ("packed", "padded")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default=str(_record.ROOT / "train" / "lit_mix.yaml"))
    p.add_argument("--samples", type=int, default=6400, help="training samples a run")
    p.add_argument("--rounds", type=int, default=2, help="runs each way, alternating")
    p.add_argument("--set", action="append", default=[], help="extra recipe override key=value")
    p.add_argument("--out", default="", help="also append the table (markdown) to this file")
    _record.add_record_flag(p, "allow --out to be a tracked file (e.g. benchmarks/RESULTS.md)")
    return p


@contextlib.contextmanager
def packing(on: bool):
    """Packing as clipkit does it (on), or off for every text tower, for the runs inside."""
    from clipkit.models import text_padding, towers_hf

    runs_packed, packs = towers_hf.HFTower._runs_packed, text_padding.packs
    if not on:
        towers_hf.HFTower._runs_packed = lambda self, tokens, mask: False
        text_padding.packs = lambda device: False
    try:
        yield
    finally:
        towers_hf.HFTower._runs_packed, text_padding.packs = runs_packed, packs


def train_once(args: argparse.Namespace, way: str, out: Path, n: int) -> float:
    """Training-loop seconds of one run of the recipe, packed or padded."""
    import clipkit

    overrides = [
        f"train.output_dir={out}",
        f"train.run_name={way}_{n}",
        f"train.samples={args.samples}",
        "train.checkpoint_every=0",
        "data.val=",
        *args.set,
    ]
    log = io.StringIO()
    with packing(way == "packed"), contextlib.redirect_stdout(log):
        run_dir = clipkit.train(args.recipe, overrides)
    shutil.rmtree(run_dir, ignore_errors=True)
    found = DONE.findall(log.getvalue())
    if not found:
        raise RuntimeError(f"no 'samples seen in' line in the {way} run's output:\n{log.getvalue()[-2000:]}")
    return float(found[-1])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    load = _record.load_average()
    out = _record.RUNS / "text_packing"
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for r in range(args.rounds):
        for way in WAYS if r % 2 == 0 else WAYS[::-1]:
            times[way].append(train_once(args, way, out, r))
            print(f"  round {r + 1}: {way}: {times[way][-1]:.1f} s", flush=True)
    packed, padded = (statistics.median(times[w]) for w in WAYS)
    title = f"Text packing: {Path(args.recipe).name}, {args.samples:,} samples ({time.strftime('%Y-%m-%d %H:%M')})"
    lines = [
        *_record.heading(title, "text_packing.py", argv),
        f"one process, {args.rounds} run(s) each way, alternating; training-loop seconds of each run",
        "",
        "| text tower | runs (s) | median (s) | samples/s | vs packed |",
        "|---|---|---:|---:|---:|",
    ]
    for way, med in zip(WAYS, (packed, padded)):
        runs = ", ".join(f"{t:.1f}" for t in times[way])
        lines.append(f"| {way} | {runs} | {med:.1f} | {args.samples / med:.0f} | {med / packed:.3f}x |")
    lines += ["", f"load average before {load}, after {_record.load_average()}"]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        _record.append_text(args.out, "\n" + text, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
