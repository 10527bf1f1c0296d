#!/usr/bin/env bash
# Issue 3 on the GPU machine, in one call: install (extension CPU-only: the Triton path does not use it),
# per-implementation step times + the heaviest kernels (scripts/train_step_profile.py), the Triton kernel
# tests on CUDA, then the 1000-step training parity. Logs go to $OUT.
#   device run: OUT=$OUT DATA=.data bash scripts/gpu_triton.sh   (SKIP_PARITY=1, PROFILE_ARGS="...",
#   SECOND_CASE_ARGS="--case B8-L1024-d256 ...")
set -uo pipefail
OUT=${OUT:?set OUT} DATA=${DATA:-../shared/data}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
TRM_FAST_NO_CUDA=1 python3 -m pip install -e . --no-build-isolation --no-deps > "$OUT/build.log" 2>&1 || tail "$OUT/build.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== Triton kernel tests on CUDA"
# one tiling per kernel (TRM_FAST_AUTOTUNE=0): autotuning every test shape would take minutes
TRM_FAST_AUTOTUNE=0 timeout 200 python3 -m pytest tests/test_tinynet_kernels.py tests/test_linear_cross_entropy.py -q -p no:cacheprovider \
  > "$OUT/tests.log" 2>&1
grep -E "passed|failed|Error|error" "$OUT/tests.log" | tail -n 30
echo "== step times and kernels"
timeout 300 python3 scripts/train_step_profile.py ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/profile.txt"
[ -n "${SECOND_CASE_ARGS:-}" ] && timeout 240 python3 scripts/train_step_profile.py $SECOND_CASE_ARGS 2>&1 | tee "$OUT/profile2.txt"
if [ "${SKIP_PARITY:-0}" != 1 ]; then
  echo "== training parity"
  OUT=/tmp/trm_fast_parity DATA=$DATA STEPS=${PARITY_STEPS:-1000} timeout 300 bash scripts/triton_training_parity.sh 2>&1 | tail -n 3 | tee "$OUT/parity.txt"
fi
