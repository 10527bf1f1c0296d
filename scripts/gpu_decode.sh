#!/usr/bin/env bash
# Issue 5 on the GPU in one call of the device tool: the decoder's CUDA tests (exact tokens against the
# seed, kernels against torch), the tile sweep of the batched step's kernels (with TILES=1), the decode profile
# (now vs the previous kernels, each kernel alone; SKIP_PROFILE=1 skips it) and the generation benchmark
# (SKIP_BENCH=1 skips it); logs and JSON under $OUT.
#   device run: OUT=$OUT bash scripts/gpu_decode.sh
set -uo pipefail
OUT=${OUT:-/tmp/trm_fast_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -m pip install -e . --no-build-isolation --no-deps > "$OUT/build.log" 2>&1 || status=1
python3 -m trm_fast doctor | grep -E "cuda|decode"

echo "== decoder tests on CUDA"
timeout ${TEST_TIMEOUT:-200} python3 -m pytest tests/test_decode_kernels.py tests/test_decode_step.py tests/test_generation.py -q -x \
  -p no:cacheprovider -k cuda > "$OUT/tests.log" 2>&1 || status=1
tail -n 8 "$OUT/tests.log"

if [ -n "${TILES:-}" ]; then
  echo "== tile-linear sweep"
  timeout ${TILES_TIMEOUT:-300} python3 scripts/decode_tiles.py ${TILES_ARGS:-} --out "$OUT/decode_tiles.json" \
    > "$OUT/decode_tiles.txt" 2>&1 || status=1
  cat "$OUT/decode_tiles.txt"
fi

if [ -z "${SKIP_PROFILE:-}" ]; then
  echo "== decode profile"
  timeout ${PROFILE_TIMEOUT:-240} python3 scripts/decode_profile.py --out "$OUT/decode_profile.json" \
    > "$OUT/decode_profile.txt" 2>&1 || status=1
  cat "$OUT/decode_profile.txt"
fi

if [ -z "${SKIP_BENCH:-}" ]; then
  echo "== generation benchmark"
  timeout ${BENCH_TIMEOUT:-200} python3 -m pytest benchmarks -k generate --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$OUT/bench_generate.json" --benchmark-columns=median,iqr,rounds > "$OUT/bench.log" 2>&1 || status=1
  tail -n 12 "$OUT/bench.log"
  [ -f "$OUT/bench_generate.json" ] && python3 benchmarks/summarize.py "$OUT/bench_generate.json"
fi
exit $status
