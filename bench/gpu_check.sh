#!/usr/bin/env bash
# The one prepared GPU check (at most 8 minutes on an H100/H200): installs the wheels the device image lacks, then
# runs bench/gpu_check.py, which runs the six steps (GPU tests, a training step per method in bf16 and fp16, NCCL
# with 2+ GPUs, inference and training against their bare bounds, a short DINO learning run), prints one table and
# writes $OUT/gpu_check.json, gpu_check.log, bench_train.json and bench_inference.json. Exit code 1 when any step
# failed.
# The image has torch, timm, pandas, scikit-learn, scikit-image, tifffile, tensorboard and tqdm; pycytominer,
# copairs, cp-measure, harmonypy and their dependencies come as wheels in .whl/ (`make gpu-wheels`; the device run
# must carry .whl, which git ignores).
# Usage on the device machine:  bash bench/gpu_check.sh
# Dry run here (toy sizes on the CPU, no wheel install):
#   PY=.venv/bin/python OUT=/tmp/gpucheck bash bench/gpu_check.sh --dry-run
set -uo pipefail
STARTED=$(date +%s)
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
PY="${PY:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if [[ " $* " != *" --dry-run "* ]] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PY" bench/gpu_check.py --out "$OUT" --started_at "$STARTED" "$@"
