#!/usr/bin/env bash
# Issue 4 in one call of the device tool:
#  - trains the early-exit models side by side for MINUTES: byte tokenizer, tinyshakespeare, supervision_steps 4,
#    8 heads, one per "d_model:lr" of MODELS (default d512 at lr 3e-4; at 6e-4 it diverged). Two models and their
#    benchmarks do not fit the device tool's 600 s call (session 10), nor their files its 8-file return;
#  - meanwhile builds trm_fast._C with CUDA and runs the extension / early-exit tests on the GPU;
#  - then scripts/early_exit_bench.py on each trained model (alone on the GPU).
# usage: OUT=/some/dir DATA=.data MINUTES=3.5 bash scripts/gpu_early_exit.sh
set -uo pipefail
OUT=${OUT:?set OUT} DATA=${DATA:-../shared/data} MODELS=${MODELS:-512:3e-4}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" runs
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
pids=()
for model in $MODELS; do
  d=${model%%:*} lr=${model##*:}
  PYTHONPATH=$PWD python -m trm_fast train --data "$DATA/tinyshakespeare.txt" --pack --preset small \
    --set supervision_steps=4 d_model=$d n_heads=8 dropout=0.1 --seq-len 512 --batch-size 32 --lr $lr \
    --adam-beta2 0.95 --weight-decay 0.1 --warmup-steps 300 --minutes "${MINUTES:-3.5}" --eval-every 500 \
    --log-every 100 --out runs/early_exit_d$d --summary "$OUT/model_d$d.json" > "$OUT/train_d$d.log" 2>&1 &
  pids+=($!)
done
echo "== build"
python -m pip install -e . --no-build-isolation --no-deps > "$OUT/build.log" 2>&1 || echo "build failed"
python -m trm_fast doctor | tee "$OUT/doctor.txt"
echo "== tests (CUDA)"
python -m pytest tests/test_extension.py tests/test_early_exit.py -q -p no:cacheprovider > "$OUT/tests.log" 2>&1
tail -n 5 "$OUT/tests.log"
wait "${pids[@]}"
for model in $MODELS; do
  d=${model%%:*}
  tail -n 4 "$OUT/train_d$d.log" | head -n 1
  echo "== early-exit benchmark, d$d"
  python scripts/early_exit_bench.py --checkpoint runs/early_exit_d$d/checkpoint.pt \
    --data "$DATA/tinyshakespeare.txt" --out "$OUT/early_exit_d$d.json" > "$OUT/bench_d$d.log" 2>&1
  grep -v '^ ' "$OUT/bench_d$d.log" | tail -n 8
  python - "$OUT/early_exit_d$d.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print({k: d[k] for k in ("exit_counts", "compute_cost", "ms_no_exit", "ms_early_exit", "early_exit_tinynet_ops",
                         "speedup", "ideal_speedup", "realized_fraction_of_ideal", "ms_routing_gpu", "ms_step_gpu",
                         "routing_fraction_of_step", "val_ppl_no_exit", "ppl_ratio", "val_ppl_exit_logits_unfrozen",
                         "ms_no_exit_plain_forward_cuda_graph", "speedup_over_plain_forward_cuda_graph")})
PY
done
