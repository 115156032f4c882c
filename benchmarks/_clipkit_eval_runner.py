"""Run ``clipkit <args>`` exactly as the ``clipkit`` console script does, then report threads.

    .venv/bin/python benchmarks/_clipkit_eval_runner.py eval zeroshot --model ... --threads 2

benchmarks/eval_parity.py starts clipkit's side through this file so that, like CLIP_benchmark's
side (``_clipbench_runner.py``), the process prints the torch thread count it actually ran with
(``[bench-threads] torch N``) after the command: the summary reports what each tool used, not
what was asked for.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    import torch

    from clipkit.cli.main import main as clipkit_main

    try:
        return clipkit_main(argv)
    finally:
        print(f"[bench-threads] torch {torch.get_num_threads()}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
