#!/usr/bin/env bash
# Issue 4 (and issue 7's GPU run beside it) in one call of the device tool:
#  - trains the early-exit model (small preset at d256, supervision_steps 4, tinyshakespeare) for MINUTES,
#    and, at the same time, scripts/task_vectors.py for TV_MINUTES (0: skip);
#  - meanwhile builds trm_fast._C with CUDA and runs the extension / early-exit tests on the GPU;
#  - then scripts/early_exit_bench.py on the trained model (alone on the GPU).
# usage: OUT=/some/dir DATA=.data MINUTES=4.5 TV_MINUTES=4.5 bash scripts/gpu_early_exit.sh
set -uo pipefail
OUT=${OUT:?set OUT} DATA=${DATA:-../shared/data}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" runs
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
PYTHONPATH=$PWD python -m trm_fast train --data "$DATA/tinyshakespeare.txt" --pack --preset small \
  --set supervision_steps=4 d_model=256 n_heads=8 dropout=0.1 --seq-len 512 --batch-size 32 --lr 6e-4 \
  --adam-beta2 0.95 --weight-decay 0.1 --warmup-steps 300 --minutes "${MINUTES:-4.5}" --eval-every 500 \
  --log-every 100 --out runs/early_exit_model --summary "$OUT/early_exit_model.json" > "$OUT/early_exit_train.log" 2>&1 &
train_pid=$!
if [ "${TV_MINUTES:-0}" != 0 ]; then
  PYTHONPATH=$PWD python scripts/task_vectors.py --minutes "$TV_MINUTES" --preset small --out runs/task_vectors \
    > "$OUT/task_vectors.log" 2>&1 &
fi
echo "== build"
python -m pip install -e . --no-build-isolation --no-deps > "$OUT/build.log" 2>&1 || echo "build failed"
python -m trm_fast doctor | tee "$OUT/doctor.txt"
echo "== tests (CUDA)"
python -m pytest tests/test_extension.py tests/test_early_exit.py -q -p no:cacheprovider > "$OUT/tests.log" 2>&1
tail -n 5 "$OUT/tests.log"
wait
tail -n 2 "$OUT/early_exit_train.log"
[ -f runs/task_vectors/task_vectors.json ] && cp runs/task_vectors/task_vectors.json "$OUT/" && tail -n 8 "$OUT/task_vectors.log"
echo "== early-exit benchmark"
python scripts/early_exit_bench.py --checkpoint runs/early_exit_model/best.pt --data "$DATA/tinyshakespeare.txt" \
  --out "$OUT/early_exit.json" > "$OUT/early_exit_bench.log" 2>&1
tail -n 40 "$OUT/early_exit_bench.log"
