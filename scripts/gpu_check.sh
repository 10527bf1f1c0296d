#!/usr/bin/env bash
# Everything the GPU has to show, in one call of the device tool: build trm_fast._C with CUDA, run the
# test suite on the GPU, run the benchmarks, and leave logs and the results JSON under $OUT.
#   device run: DATA=.data bash scripts/gpu_check.sh   (DATA: a folder with tinyshakespeare.txt)
set -uo pipefail
OUT=${OUT:-/tmp/trm_fast_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

echo "== build"
python3 -m pip install -e . --no-build-isolation --no-deps > "$OUT/build.log" 2>&1 || status=1
grep -E "trm_fast:|error|Successfully" "$OUT/build.log"
python3 -m trm_fast doctor | tee "$OUT/doctor.txt"

echo "== tests"
python3 -m pytest tests -q -p no:cacheprovider > "$OUT/tests.log" 2>&1 || status=1
tail -n 25 "$OUT/tests.log"

echo "== Triton training parity (issue 3)"
# its runs stay out of $OUT (the device tool returns 8 files); the verdict goes to tests.log
OUT=/tmp/trm_fast_parity DATA=${DATA:-../shared/data} STEPS=${PARITY_STEPS:-1000} timeout 240 \
  bash scripts/triton_training_parity.sh 2>&1 | tail -n 3 | tee -a "$OUT/tests.log"

echo "== decode profile"
timeout 240 python3 scripts/decode_profile.py > "$OUT/decode_profile.txt" 2>&1 || status=1
cat "$OUT/decode_profile.txt" | tail -n 60

echo "== benchmarks"
python3 -m pytest benchmarks --benchmark-only -q -p no:cacheprovider --benchmark-json="$OUT/bench.json" \
    --benchmark-columns=median,iqr,min,rounds > "$OUT/bench.log" 2>&1 || status=1
tail -n 30 "$OUT/bench.log"
[ -f "$OUT/bench.json" ] && python3 benchmarks/summarize.py "$OUT/bench.json" | tee "$OUT/bench.md"
exit $status
