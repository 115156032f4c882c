#!/usr/bin/env bash
# `make bench`: every side-by-side benchmark, for a quiet machine. Each appends its report, with its
# command and the load average at its start and end, to benchmarks/RESULTS.md (--record).
# Long (hours on 2 cores); each anchor tool gets its own environment, built when missing.
# A benchmark exits 1 when it misses a target it prints: every one still runs, and this script
# exits 1 at the end, naming those that missed or failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
bash benchmarks/setup_openclip_env.sh || exit 1
bash benchmarks/setup_clipbench_env.sh || exit 1
bash benchmarks/setup_autofaiss_env.sh || exit 1

missed=()
bench() {
    echo "=== $PY $*"
    "$PY" "$@" || missed+=("$*")
}
# ViT-S-32-alt from scratch: nine seeds, since a run there either stays at chance level (ln 64)
# or leaves it, batch by batch, and three seeds measure the luck of those three (README).
bench benchmarks/train_throughput.py --setups small --seeds 0 1 2 3 4 5 6 7 8 --record
bench benchmarks/train_throughput.py --setups lit --seeds 0 1 2 --record
bench benchmarks/train_throughput.py --setups small --small-model clipkit-tiny-ViT --small-image-size 32 --small-context-length 16 --small-samples 8192 --seeds 0 1 2 --record
bench benchmarks/loader_throughput.py --samples 3000 --shards 8 --repeats 3 --record
bench benchmarks/eval_parity.py --threads 2 --record
bench benchmarks/eval_parity.py --model demo224 --threads 2 --repeats 3 --record
bench benchmarks/cache_fill.py --shards 3 --repeats 2 --record
bench benchmarks/feature_cache_speedup.py --repeats 3 --record
bench benchmarks/loss_memory.py --record
bench benchmarks/index_vs_autofaiss.py --n 300000 --no-bundled --record
bench benchmarks/index_vs_autofaiss.py --n 1000000 --record
bench benchmarks/chaos.py --record
bench benchmarks/objectives.py --record
bench benchmarks/scaling.py --record
bench benchmarks/engines.py --record
bench benchmarks/scale_throughput.py --record

if ((${#missed[@]})); then
    printf 'missed a target or failed: %s\n' "${missed[@]}" >&2
    exit 1
fi
echo "every benchmark met its targets"
