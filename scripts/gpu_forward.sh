#!/usr/bin/env bash
# Issue 3's no-grad forward in one call of the device tool: build trm_fast._C, run GraphedForward's tests on the
# GPU, then the forward rows of the model benchmark at the seed's config (B16 L512 d512, bf16 autocast): eager
# reference, torch.compile (default and reduce-overhead), the torch and Triton paths, each also as one CUDA graph.
# usage: OUT=/some/dir bash scripts/gpu_forward.sh
set -uo pipefail
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/setup.log"
python3 -m pip install -e . --no-build-isolation --no-deps >> "$OUT/setup.log" 2>&1 || echo "build failed"
python3 -m pytest tests/test_graphed_forward.py -q -p no:cacheprovider > "$OUT/tests.log" 2>&1
tail -n 3 "$OUT/tests.log"
python3 -m pytest benchmarks/test_bench_model.py --benchmark-only -q -p no:cacheprovider \
    -k "forward and ${CASE:-B16} and not nologits" --benchmark-json="$OUT/forward.json" \
    --benchmark-columns=median,iqr,min,rounds > "$OUT/forward.log" 2>&1
tail -n 14 "$OUT/forward.log"
[ -f "$OUT/forward.json" ] && python3 benchmarks/summarize.py "$OUT/forward.json" | tee "$OUT/forward.md"
