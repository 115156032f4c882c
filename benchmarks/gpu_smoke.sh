#!/usr/bin/env bash
# GPU smoke benchmark (issue #13): train two open_clip models from random init on one GPU and
# print samples/s and peak memory for each.
#
#   tiny   train/tiny_openclip.yaml as it is (2-layer ViT on 32x32 images, 32-d)
#   vitb32 the same recipe with open_clip:ViT-B-32 towers (224x224 images, 77 tokens, 512-d;
#          ~151 M parameters, built offline from open_clip's bundled config and tokenizer)
#
# Both train on the emoji shards (built into $DATA when missing), STEPS optimizer steps each,
# in $PRECISION, on one process. Each run's metrics.csv gives samples/s (mean over the rows after
# the first two, which hold start-up and compilation) and peak memory (peak_mem_gib on a GPU:
# torch.cuda.max_memory_allocated; peak_rss_gib on a CPU). The script exits non-zero when a run
# fails, logs a non-finite loss or skipped step, or (STEPS >= 100) ends with no lower loss than
# it started with.
#
#   benchmarks/gpu_smoke.sh                                   # a GPU machine: 300 steps, bf16
#   STEPS=4 DEVICE_CHECK=0 PRECISION=fp32 benchmarks/gpu_smoke.sh   # check the script on a CPU
#
# Settings (environment): STEPS (300), PRECISION (bf16; fp16, fp32), BATCH_TINY (512),
# BATCH_B32 (256), WORKERS (8 loader workers, at most one per shard), COMPILE (0; 1 =
# train.compile=true), MODELS ("tiny vitb32"), DATA (data/emoji), OUT (runs/gpu_smoke: each
# run's folder is replaced), DEVICE_CHECK (1: refuse to run without a CUDA device), PYTHON
# (.venv/bin/python when present, else python3), EXTRA (more dotted overrides for every run,
# space-separated, e.g. EXTRA="data.resampled=true").
set -euo pipefail

cd "$(dirname "$0")/.."
STEPS=${STEPS:-300}
PRECISION=${PRECISION:-bf16}
BATCH_TINY=${BATCH_TINY:-512}
BATCH_B32=${BATCH_B32:-256}
WORKERS=${WORKERS:-8}
COMPILE=${COMPILE:-0}
MODELS=${MODELS:-tiny vitb32}
DATA=${DATA:-data/emoji}
OUT=${OUT:-runs/gpu_smoke}
DEVICE_CHECK=${DEVICE_CHECK:-1}
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

say() { echo "gpu_smoke: $*"; }
fail() { echo "gpu_smoke: FAILED: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------- the device
if [[ "$DEVICE_CHECK" == 1 ]]; then
    if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_smoke: no CUDA device here (torch.cuda.is_available() is False): this benchmark needs" \
            "one GPU. To check the script itself on a CPU: STEPS=4 DEVICE_CHECK=0 PRECISION=fp32 $0" >&2
        exit 2
    fi
    "$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu_smoke: GPU {p.name},' \
        f' {p.total_memory / 2**30:.0f} GiB, compute {p.major}.{p.minor}, torch {torch.__version__}')"
else
    say "DEVICE_CHECK=0: running on whatever device torch finds (a CPU check of the script)"
fi
say "load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown); $(nproc) CPU cores"

# ---------------------------------------------------------------------------- the data
if ! compgen -G "$DATA/train/*.tar" > /dev/null; then
    say "no shards in $DATA/train: building them (clipkit data build emoji --out $DATA)"
    "$PYTHON" -m clipkit.cli.main data build emoji --out "$DATA"
fi
SHARDS=$(find "$DATA/train" -maxdepth 1 -name '*.tar' | wc -l)
if (( WORKERS > SHARDS )); then WORKERS=$SHARDS; fi  # every loader worker reads its own shard(s)
say "data $DATA/train: $SHARDS shards, $WORKERS loader workers"

# ---------------------------------------------------------------------------- the runs
summary() {  # run folder -> one line; exits non-zero on a failed check
    "$PYTHON" - "$1" "$STEPS" <<'EOF'
import csv, json, math, sys
from pathlib import Path

run, steps = Path(sys.argv[1]), int(sys.argv[2])
rows = list(csv.DictReader(open(run / "metrics.csv", newline="")))
info = json.loads((run / "system.json").read_text())
if not rows:
    sys.exit(f"{run}: metrics.csv has no rows")
timed = rows[2:] if len(rows) > 4 else rows  # the first rows hold start-up and compilation
rate = sum(float(r["samples_per_s"]) for r in timed) / len(timed)
per_rank = sum(float(r["samples_per_s_rank"]) for r in timed) / len(timed)
mem_col = "peak_mem_gib" if "peak_mem_gib" in rows[0] else "peak_rss_gib"
peak = max(float(r[mem_col]) for r in rows)
losses = [float(r["loss"]) for r in rows]
device = info.get("gpu", {}).get("name", info["device"])
print(
    f"{run.name:8s} {device} {info['precision']}: step {rows[-1]['step']}, {rate:,.0f} samples/s "
    f"({per_rank:,.0f} per rank), {mem_col} {peak:.2f}, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
)
problems = []
if not all(math.isfinite(x) for x in losses):
    problems.append("a non-finite loss was logged")
if int(rows[-1]["nonfinite_steps"]):
    problems.append(f"{rows[-1]['nonfinite_steps']} steps were skipped as non-finite")
if int(rows[-1]["step"]) != steps:
    problems.append(f"the run ended at step {rows[-1]['step']}, not {steps}")
if steps >= 100 and not losses[-1] < losses[0]:
    problems.append(f"the loss did not fall ({losses[0]:.3f} -> {losses[-1]:.3f})")
if problems:
    sys.exit(f"{run}: " + "; ".join(problems))
EOF
}

train() {  # name, batch, overrides...
    local name=$1 batch=$2
    shift 2
    rm -rf "${OUT:?}/$name"
    say "training $name: $STEPS steps of $batch, $PRECISION"
    "$PYTHON" -m clipkit.cli.main train train/tiny_openclip.yaml \
        data.train="$DATA/train" data.batch_size="$batch" data.workers="$WORKERS" \
        train.samples=$((STEPS * batch)) train.precision="$PRECISION" \
        train.output_dir="$OUT" train.run_name="$name" train.checkpoint_every="$STEPS" train.log_every=10 \
        optim.warmup_steps=$((STEPS / 10 + 1)) train.compile="$([[ $COMPILE == 1 ]] && echo true || echo false)" \
        "$@" "${EXTRA_ARGS[@]}" || fail "clipkit train ($name) exited with $?"
}

lines=()
for model in $MODELS; do
    case $model in
        tiny) train tiny "$BATCH_TINY" ;;
        vitb32)
            train vitb32 "$BATCH_B32" \
                model.vision.name=open_clip:ViT-B-32 model.vision.image_size=224 \
                model.text.name=open_clip:ViT-B-32 model.text.context_length=77 \
                model.embed_dim=512 model.projection=none optim.lr=5e-4
            ;;
        *) fail "unknown model '$model' in MODELS (known: tiny vitb32)" ;;
    esac
    line=$(summary "$OUT/$model") || fail "the checks of $model (above)"
    echo "$line"
    lines+=("$line")
done

echo
say "results ($STEPS steps each; commands above)"
printf '  %s\n' "${lines[@]}"
