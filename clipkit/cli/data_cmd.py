"""``clipkit data build SOURCE --out DIR``: turn a real source into webdataset shards."""

from __future__ import annotations

import argparse
import json

BUILDERS = {
    "emoji": "data_tools.build_emoji",
    "animal-mnist": "data_tools.build_animal_mnist",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="build webdataset shards from real sources")
    dsub = p.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser(
        "build",
        help="build shards from a bundled source",
        description="emoji: twemoji PNGs paired with their names (train/ and val/ shards). "
        "animal-mnist: Animal-MNIST silhouettes in CLIP_benchmark's local webdataset layout.",
    )
    b.add_argument("source", choices=sorted(BUILDERS))
    b.add_argument("--out", required=True, help="output folder")
    b.set_defaults(run=run_build)


def run_build(args: argparse.Namespace) -> int:
    import importlib

    counts = importlib.import_module(BUILDERS[args.source]).build(args.out)
    print(json.dumps({"source": args.source, "out": args.out, "counts": counts}, indent=2))
    return 0
