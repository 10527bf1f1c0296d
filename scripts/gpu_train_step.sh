#!/usr/bin/env bash
# Issue 3's train step on the GPU machine, in one call of the device tool (the CUDA extension built: the TinyNet
# path's cuBLASLt products are its trm_fast::lt_matmul): the kernels' and GraphedTrainStep's CUDA tests, then
# per-implementation step times and peak memory (scripts/train_step_profile.py: medians of 20, one process) with
# the heaviest kernels of the eager Triton step. Logs and the results JSON go to $OUT.
#   device run: OUT=$OUT bash scripts/gpu_train_step.sh
#   TESTS: pytest -k expression, or "none" to skip the tests; CASE: B16-L512-d512 | B8-L1024-d256;
#   IMPLS, MODES, PROFILE: train_step_profile.py's --impls, --modes, --profile
set -uo pipefail
OUT=${OUT:?set OUT}
CASE=${CASE:-B16-L512-d512}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/setup.log"
python3 -m pip install -e . --no-build-isolation --no-deps >> "$OUT/setup.log" 2>&1 || echo "build failed"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
(cd /tmp && python3 -m trm_fast doctor | grep lt_matmul)
if [ "${TESTS:-}" != none ]; then
  echo "== CUDA tests"
  # one tiling per kernel (TRM_FAST_AUTOTUNE=0): autotuning every test shape would take minutes
  TRM_FAST_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-300}" python3 -m pytest tests/test_tinynet_kernels.py \
    tests/test_graphed_train_step.py tests/test_linear_cross_entropy.py -q -p no:cacheprovider \
    ${TESTS:+-k "$TESTS"} > "$OUT/tests.log" 2>&1
  grep -E "passed|failed|Error|error" "$OUT/tests.log" | tail -n 30
fi
echo "== step times, $CASE"
timeout "${PROFILE_TIMEOUT:-400}" python3 scripts/train_step_profile.py --case "$CASE" \
  --impls ${IMPLS:-eager compiled compiled-graphs torch torch-graph triton triton-graph triton-nologits-graph} \
  --modes ${MODES:-train forward} --profile ${PROFILE-triton} --json "$OUT/steps_$CASE.json" \
  ${SEQUENCES:+--sequences "$OUT"} 2>&1 \
  | grep -v "UserWarning\|_warn_once" | tee "$OUT/steps_$CASE.txt"
