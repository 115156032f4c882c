#!/usr/bin/env bash
# `make bench`: every side-by-side benchmark, each appending its result and command to RESULTS.md.
# Long (an hour or more on 2 cores); each anchor tool gets its own environment, built when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
bash benchmarks/setup_openclip_env.sh
bash benchmarks/setup_clipbench_env.sh
bash benchmarks/setup_autofaiss_env.sh
$PY benchmarks/train_throughput.py
$PY benchmarks/loader_throughput.py --samples 3000 --shards 8 --repeats 3
$PY benchmarks/eval_parity.py
$PY benchmarks/loss_memory.py --append
$PY benchmarks/index_vs_autofaiss.py
$PY benchmarks/chaos.py --append
$PY benchmarks/objectives.py
$PY benchmarks/scaling.py --record
