"""The one ``clipkit`` command: ``clipkit {data,train,eval,export,index,sweep,demo} ...``.

Each subcommand lives in its own module under ``clipkit/cli/`` and exposes
``add_parser(subparsers)`` and ``run(args) -> int``. Imports of heavy libraries happen
inside ``run`` so ``clipkit --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from clipkit.errors import ClipkitError

SUBCOMMANDS = ["data", "train", "eval", "export", "index", "sweep", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipkit",
        description="Train, evaluate and search with dual-encoder image-text models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name in SUBCOMMANDS:
        importlib.import_module(f"clipkit.cli.{name}_cmd").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Nothing is ever fetched from a model hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if (argv if argv is not None else sys.argv[1:])[:1] == ["index"]:
        # FAISS's OpenMP threads then sleep instead of spinning while they wait: on cores shared
        # with other jobs, index builds and searches measured 1.5-2x faster (set before any
        # OpenMP runtime starts; an explicit setting wins).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("clipkit: interrupted", file=sys.stderr)
        return 130
    except ClipkitError as err:
        print(f"clipkit {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
