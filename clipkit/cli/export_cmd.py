"""``clipkit export --model SPEC --out DIR``: any model spec as an open_clip model (config + weights)."""

from __future__ import annotations

import argparse

# Static (the registry imports torch; --help stays instant): the kinds of clipkit.models.specs.
MODEL_HELP = (
    "a run folder, a checkpoint file, open_clip:<config>[@<weights>], hf-clip:<local folder>, "
    "a recipe .yaml or package.module:function (clipkit.models.specs)"
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a model as an open_clip model that other tools can load",
        description="Writes DIR/open_clip_config.json, DIR/open_clip_model.safetensors, DIR/<name>.json "
        "and DIR/README.md, then loads the result with open_clip and checks its embeddings match.",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--name", default="", help="open_clip model name (default: clipkit-<run folder or model name>)"
    )
    p.add_argument("--atol", type=float, default=1e-5, help="largest embedding difference accepted")
    p.add_argument(
        "--check", action=argparse.BooleanOptionalAction, default=True, help="load back and compare"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from clipkit.models.export import export_open_clip

    info = export_open_clip(args.model, args.out, args.name, args.atol, args.check)
    print(f"exported {info['source']} as open_clip model '{info['name']}' ({info['tensors']} tensors)")
    if info["max_abs_diff"] is not None:
        print(f"  open_clip reproduces its embeddings to {info['max_abs_diff']:.1e}")
    print(
        f'  load: open_clip.create_model_and_transforms("local-dir:{info["out"]}")  (see {info["out"]}/README.md)'
    )
    return 0
