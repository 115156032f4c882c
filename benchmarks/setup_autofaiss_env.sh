#!/usr/bin/env bash
# Create the separate autofaiss environment used by benchmarks/index_vs_autofaiss.py.
#
# autofaiss 2.18 needs numpy<2 (the main .venv has numpy 2), so it gets its own virtualenv,
# (and pyarrow<20, the last releases built for numpy 1), with the same faiss-cpu release as the main .venv so both sides run the same kernels.
# autofaiss 2.18 fails on every OPQ* index key with faiss-cpu >= 1.8 (see the patch below);
# the patch is applied in place and checked.
#
# Idempotent: creates the env only when it is missing (or incomplete).
# Usage: bash benchmarks/setup_autofaiss_env.sh [ENV_DIR]   (default .venv-autofaiss)
#        FORCE=1 bash benchmarks/setup_autofaiss_env.sh     (recreate)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENV_DIR="${1:-$ROOT/.venv-autofaiss}"
PY="${PYTHON:-python3}"
STAMP="$ENV_DIR/.clipkit-autofaiss-env-ok"
FAISS_VERSION="$("$ROOT/.venv/bin/python" -c 'import faiss; print(faiss.__version__)' 2>/dev/null || echo 1.15.1)"

if [[ "${FORCE:-0}" == "1" ]]; then
    rm -rf "$ENV_DIR"
fi

if [[ -f "$STAMP" ]]; then
    echo "autofaiss env already present: $ENV_DIR"
    exit 0
fi

start=$(date +%s)
if [[ ! -x "$ENV_DIR/bin/python" ]]; then
    "$PY" -m venv "$ENV_DIR"
fi
"$ENV_DIR/bin/python" -m pip install --disable-pip-version-check -q \
    "autofaiss==2.18.0" "faiss-cpu==$FAISS_VERSION" "numpy<2" "pyarrow<20"

# The patch: autofaiss calls faiss.OPQMatrix(d, M=..., d2=...), but the SWIG constructor's
# keyword is M_in since faiss 1.8, so every OPQ* key raises TypeError. Pass them positionally.
FACTORY="$("$ENV_DIR/bin/python" -c 'import autofaiss.indices.index_factory as m; print(m.__file__)')"
sed -i 's/faiss.OPQMatrix(d, M=M_OPQ, d2=out_d)/faiss.OPQMatrix(d, M_OPQ, out_d)/' "$FACTORY"

"$ENV_DIR/bin/python" - <<'PY'
import importlib.metadata as md
import inspect

import autofaiss.indices.index_factory as factory
import autofaiss  # noqa: F401
import faiss
import numpy

assert "M=M_OPQ" not in inspect.getsource(factory), "OPQ patch not applied"
index = factory.index_factory(64, "OPQ16_64,IVF16,PQ16x8", faiss.METRIC_INNER_PRODUCT)
print("autofaiss", md.version("autofaiss"), "| faiss-cpu", faiss.__version__, "| numpy", numpy.__version__)
PY

touch "$STAMP"
echo "autofaiss env ready in $(( $(date +%s) - start )) s: $ENV_DIR"
