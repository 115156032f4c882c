"""Run CLIP_benchmark's own ``clip_benchmark eval`` CLI, after registering extra open_clip configs.

Runs inside ``.venv-clipbench`` (``benchmarks/setup_clipbench_env.sh``). CLIP_benchmark looks
models up by open_clip config name, and clipkit's tiny test configs are not built into
open_clip, so this registers them with ``open_clip.add_model_config`` in the same process and
then hands the rest of the command line to ``clip_benchmark.cli.main`` unchanged:

    python _clipbench_runner.py --config-dir DIR [--config-dir DIR ...] [--threads N] -- eval --dataset ...

``--threads N`` (N > 0) sets torch's intra-op threads before CLIP_benchmark starts (it has no
flag of its own; OMP_NUM_THREADS is set by the caller too). When CLIP_benchmark is done, the
process prints the thread count torch actually ran with, as ``[bench-threads] torch N``.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    if "--" not in argv:
        raise SystemExit(
            "usage: _clipbench_runner.py [--config-dir DIR ...] [--threads N] -- <clip_benchmark args>"
        )
    cut = argv.index("--")
    own, rest = argv[:cut], argv[cut + 1 :]
    dirs = [own[i + 1] for i, a in enumerate(own) if a == "--config-dir"]
    threads = [int(own[i + 1]) for i, a in enumerate(own) if a == "--threads"]
    import open_clip
    import torch

    if threads and threads[-1] > 0:
        torch.set_num_threads(threads[-1])
    for d in dirs:
        open_clip.add_model_config(d)
    from clip_benchmark.cli import main as clip_benchmark_main

    sys.argv = ["clip_benchmark", *rest]
    try:
        clip_benchmark_main()
    finally:
        print(f"[bench-threads] torch {torch.get_num_threads()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
