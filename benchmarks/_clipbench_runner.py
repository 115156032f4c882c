"""Run CLIP_benchmark's own ``clip_benchmark eval`` CLI, after registering extra open_clip configs.

Runs inside ``.venv-clipbench`` (``benchmarks/setup_clipbench_env.sh``). CLIP_benchmark looks
models up by open_clip config name, and clipkit's tiny test configs are not built into
open_clip, so this registers them with ``open_clip.add_model_config`` in the same process and
then hands the rest of the command line to ``clip_benchmark.cli.main`` unchanged:

    python _clipbench_runner.py --config-dir DIR [--config-dir DIR ...] -- eval --dataset ...
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit("usage: _clipbench_runner.py [--config-dir DIR ...] -- <clip_benchmark args>")
    cut = argv.index("--")
    own, rest = argv[:cut], argv[cut + 1 :]
    dirs = [own[i + 1] for i, a in enumerate(own) if a == "--config-dir"]
    import open_clip

    for d in dirs:
        open_clip.add_model_config(d)
    from clip_benchmark.cli import main as clip_benchmark_main

    sys.argv = ["clip_benchmark", *rest]
    clip_benchmark_main()


if __name__ == "__main__":
    main(sys.argv[1:])
