"""The one ``clipkit`` command: ``clipkit {data,train,eval,export,index,sweep,demo} ...``.

Each subcommand lives in its own module under ``clipkit/cli/`` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``. Imports of heavy libraries happen
inside ``run`` so ``clipkit --help`` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import sys
from collections.abc import Iterator

from clipkit import allocator
from clipkit.errors import ClipkitError

SUBCOMMANDS = ["data", "train", "eval", "export", "index", "sweep", "demo"]

# The heavy modules a subcommand imports (torch, open_clip, timm, transformers), loaded by the
# console script with the cyclic garbage collector paused (``cli``).
PRELOAD = {
    "train": ("clipkit.training.loop",),
    "demo": ("clipkit.training.loop",),
    "eval": ("clipkit.models",),
    "export": ("clipkit.models",),
    "index": ("clipkit.models",),
}
# Subcommands that never load a model: FAISS and pyarrow only. Preloading torch for them cost
# `index build` 5.7 s and 0.8 GiB of peak RSS on a 2-core machine (measured with
# benchmarks/index_vs_autofaiss.py, whose build time counts the whole process).
NOT_PRELOADED = {("index", "build"), ("index", "merge")}


def preloaded_modules(argv: list[str]) -> tuple[str, ...]:
    """The heavy modules the console script imports before running ``argv``."""
    if not argv or {"-h", "--help"} & set(argv) or tuple(argv[:2]) in NOT_PRELOADED:
        return ()
    return PRELOAD.get(argv[0], ())


# Packages a preloaded library imports only in case it is there, for a feature clipkit never
# calls: timm's ``timm.utils.summary`` imports wandb (0.3-0.4 s on a 2-core machine) for its own
# training-summary logger. They are hidden while the preload runs and visible again after it, so
# clipkit's trackers (``train.trackers=[wandb]``) and the user's code import them as usual.
SKIPPED_WHILE_PRELOADING = ("wandb",)


@contextlib.contextmanager
def optional_imports_skipped(names: tuple[str, ...]) -> Iterator[None]:
    """Within the block, ``import name`` raises ImportError for each of ``names`` not yet
    imported (a ``None`` in ``sys.modules``, Python's own marker for that); after it, they
    import as usual."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name, ...) is None:
                del sys.modules[name]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipkit",
        description="Train, evaluate and search with dual-encoder image-text models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name in SUBCOMMANDS:
        importlib.import_module(f"clipkit.cli.{name}_cmd").add_parser(sub)
    return parser


def set_environment(argv: list[str]) -> None:
    """Environment a command needs before torch, FAISS or an OpenMP runtime is loaded."""
    # Nothing is ever fetched from a model hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if argv[:1] == ["index"]:
        # FAISS's OpenMP threads then sleep instead of spinning while they wait: on cores shared
        # with other jobs, index builds and searches measured 1.5-2x faster (set before any
        # OpenMP runtime starts; an explicit setting wins).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def leave_process_group(code: int) -> None:
    """End this rank's ``torch.distributed`` process group (torchrun, ``accelerate launch``)
    before the interpreter exits; a no-op in a single process.

    After a clean command (``code`` 0) the ranks wait for each other, then destroy the group
    while the interpreter is whole. Left to interpreter exit, a gloo group can abort the
    process (SIGABRT, "terminate called without an active exception") when its threads still
    hold work as Python tears down, or when a peer that finished first has already closed its
    sockets; NCCL warns that the group was never destroyed. After a failure nothing waits:
    the peers may never arrive, and the launcher stops them.
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if code == 0:
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    set_environment(argv if argv is not None else sys.argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("clipkit: interrupted", file=sys.stderr)
        return 130
    except ClipkitError as err:
        print(f"clipkit {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code


def cli() -> int:
    """The ``clipkit`` console script: ``main`` with the cyclic garbage collector kept out of
    start-up and exit, which are most of a short command's wall time.

    Importing torch, open_clip, timm and transformers builds millions of objects, and the
    collector rescans all of them again and again while they are created: the imports take
    1.3-1.5 s less with it paused (5.4 -> 4.1 s for ``import open_clip`` on a 2-core machine).
    ``gc.freeze`` then moves what start-up built to the permanent generation, so later
    collections skip it and forked data-loader workers do not touch (copy) its pages. At exit a
    second freeze spares the interpreter its final full collection (1.3 -> 0.26 s). Nothing is
    skipped: reference counting frees and finalises as before; only the search for cycles
    among long-lived objects is left out. Tests call ``main`` in-process and are unaffected.
    """
    argv = sys.argv[1:]
    set_environment(argv)  # before the preloaded imports start an OpenMP runtime
    allocator.tune()  # before the imports allocate anything (clipkit.allocator)
    gc.disable()
    try:
        with optional_imports_skipped(SKIPPED_WHILE_PRELOADING):
            for module in preloaded_modules(argv):
                try:
                    importlib.import_module(module)
                except Exception:  # noqa: BLE001 - main imports it again and reports the error there
                    break
    finally:
        gc.freeze()
        gc.enable()
    code = main(argv)
    leave_process_group(code)
    gc.freeze()  # exit: the interpreter's final collections skip every object alive now
    return code


if __name__ == "__main__":
    sys.exit(cli())
