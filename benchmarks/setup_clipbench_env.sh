#!/usr/bin/env bash
# Create the separate CLIP_benchmark environment used by benchmarks/eval_parity.py.
#
# clip_benchmark 1.6.2 needs three fixes of its environment, each measured here:
#   - numpy<2: its accuracy() calls `.numpy()` on a tensor inside code paths that break
#     under NumPy 2 and crash *after* every image has been encoded;
#   - requests: imported by clip_benchmark but not declared as a dependency;
#   - webdataset: needed for the local "wds/" datasets (not a hard dependency either).
# torch/torchvision are the same releases as in the main .venv (their wheels lie on this
# machine's disk; the caps keep pip from downloading a new multi-GB build).
#
# Idempotent: creates the env only when it is missing (or incomplete).
# Usage: bash benchmarks/setup_clipbench_env.sh [ENV_DIR]   (default .venv-clipbench)
#        FORCE=1 bash benchmarks/setup_clipbench_env.sh     (recreate)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="${1:-$ROOT/.venv-clipbench}"
PY="${PYTHON:-python3}"
STAMP="$ENV_DIR/.clipkit-clipbench-env-ok"

if [[ "${FORCE:-0}" == "1" ]]; then
    rm -rf "$ENV_DIR"
fi

if [[ -f "$STAMP" ]]; then
    echo "CLIP_benchmark env already present: $ENV_DIR"
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$ENV_DIR/bin/python" ]]; then
    "$PY" -m venv "$ENV_DIR"
fi
PIP=("$ENV_DIR/bin/python" -m pip install --disable-pip-version-check)

"${PIP[@]}" "torch<=2.14.1" "torchvision<=0.29.1"
"${PIP[@]}" \
    "torch<=2.14.1" "torchvision<=0.29.1" \
    "clip_benchmark==1.6.2" \
    "open_clip_torch==3.3.0" \
    "numpy<2" \
    requests \
    "webdataset>=0.2"

# Sanity check: the CLI imports and NumPy is 1.x.
"$ENV_DIR/bin/python" - <<'PY'
import importlib.metadata as md
import clip_benchmark.cli  # noqa: F401
import numpy
assert numpy.__version__.startswith("1."), numpy.__version__
print("clip_benchmark", md.version("clip_benchmark"), "| open_clip_torch", md.version("open_clip_torch"),
      "| numpy", numpy.__version__, "| webdataset", md.version("webdataset"), "| torch", md.version("torch"))
PY

touch "$STAMP"
echo "CLIP_benchmark env ready in $(( $(date +%s) - start )) s: $ENV_DIR"
