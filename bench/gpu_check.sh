#!/usr/bin/env bash
# One prepared GPU check for a session that is lent an H100/H200 (device tool): about 6-7 minutes.
# The device image already has torch, timm, tifffile, pandas, scikit-learn, scikit-image, tensorboard and tqdm.
# pycytominer, copairs and cp-measure are not there: carry them as wheels in .whl/ (see the device README) or the
# steps that need them are reported as skipped. Results land in $OUT (or ./gpu_check_out) for docs/PERFORMANCE.md.
# Usage on the device machine:  bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
PY=python3
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

step() {  # step NAME TIMEOUT_S CMD...: run one check, keep its log, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "== $name"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? ($(tail -n 1 "$OUT/$name.log"))"
}

# GPU tests: the test files whose code has CUDA paths (models, augmentation, tiling, intensity, training, inference,
# the supervised baseline).
step tests 150 $PY -m pytest -q -x -p no:cacheprovider tests/test_backbones.py tests/test_augment.py \
    tests/test_tiling.py tests/test_intensity.py tests/test_cellmask.py tests/test_training.py tests/test_inference.py \
    tests/test_supervised.py
step bench_train 210 $PY bench/bench_train.py --device cuda --out "$OUT/bench_train.json"
step bench_inference 120 $PY bench/bench_inference.py --device cuda
step bench_eval 60 $PY bench/bench_eval.py --sizes 10000 --skip-full
ls -la "$OUT"
