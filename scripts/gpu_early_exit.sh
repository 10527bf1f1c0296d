#!/usr/bin/env bash
# Issue 4 in one call of the device tool:
#  - trains the early-exit model: byte tokenizer, tinyshakespeare, supervision_steps 4, 8 heads, d_model and lr from
#    MODEL ("d_model:lr", default d512 at lr 3e-4; at 6e-4 it diverged) for MINUTES, and keeps its EMA weights in
#    bf16 as $OUT/model_d<d>.pt; with CHECKPOINT (such a file from an earlier call) it trains nothing;
#  - meanwhile builds trm_fast._C with CUDA and runs the extension / early-exit tests on the GPU (TESTS=1; TESTS=quick:
#    the CUDA graph runs, CUDA vs CPU, the early-exit kernels and the row ops on CUDA; TESTS=0: none; anything else:
#    a pytest -k expression);
#  - then (alone on the GPU), for each min_steps in TIMING_RUNS (e.g. "2 1 2 1"), a separate process of
#    scripts/early_exit_bench.py --timing-only (the run-to-run spread of the speed-up); then, unless PROFILE=0,
#    scripts/early_exit_profile.py (SWEEP=1: after timing the compact attention's tiles) and (BENCH=1)
#    scripts/early_exit_bench.py.
# usage: OUT=/some/dir DATA=.data MINUTES=3.3 bash scripts/gpu_early_exit.sh
#        OUT=/some/dir DATA=.data CHECKPOINT=ckpt/model_d512.pt TESTS=0 bash scripts/gpu_early_exit.sh
set -uo pipefail
OUT=${OUT:?set OUT} DATA=${DATA:-../shared/data} MODEL=${MODEL:-512:3e-4}
d=${MODEL%%:*} lr=${MODEL##*:}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
mkdir -p "$OUT" runs
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/setup.log"
checkpoint=${CHECKPOINT:-}
if [ -z "$checkpoint" ]; then
  python -m trm_fast train --data "$DATA/tinyshakespeare.txt" --pack --preset small \
    --set supervision_steps=4 d_model=$d n_heads=8 dropout=0.1 --seq-len 512 --batch-size 32 --lr $lr \
    --adam-beta2 0.95 --weight-decay 0.1 --warmup-steps 300 --minutes "${MINUTES:-3.5}" --eval-every 500 \
    --log-every 100 --out runs/early_exit_d$d --summary runs/model_d$d.json > "$OUT/train_d$d.log" 2>&1 &
  train=$!
fi
echo "== build" | tee -a "$OUT/setup.log"
python -m pip install -e . --no-build-isolation --no-deps >> "$OUT/setup.log" 2>&1 || echo "build failed"
python -m trm_fast doctor | tee -a "$OUT/setup.log"
if [ "${TESTS:-1}" != 0 ]; then
  echo "== tests (CUDA)"
  quick="cuda_graph or cuda_equals or compact_attention or (rows and cuda) or hidden_confidence_kernel"
  case "${TESTS:-1}" in 1) filter="" ;; quick) filter="$quick" ;; *) filter="$TESTS" ;; esac
  python -m pytest tests/test_extension.py tests/test_early_exit.py -q -p no:cacheprovider -k "$filter" \
    > "$OUT/tests.log" 2>&1
  tail -n 5 "$OUT/tests.log"
fi
if [ -z "$checkpoint" ]; then
  wait $train
  cat runs/model_d$d.json >> "$OUT/train_d$d.log"
  tail -n 4 "$OUT/train_d$d.log"
  checkpoint=$OUT/model_d$d.pt
  python - runs/early_exit_d$d/checkpoint.pt "$checkpoint" <<'PY'
import sys, torch
c = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
weights = c.get("ema") or c["model"]
torch.save({"model": {k: v.bfloat16() if v.is_floating_point() else v for k, v in weights.items()},
            "config": c["config"], "step": c["step"], "optimizer": None}, sys.argv[2])
PY
fi
for min_steps in ${TIMING_RUNS:-}; do
  timeout 120 python scripts/early_exit_bench.py --checkpoint "$checkpoint" --data "$DATA/tinyshakespeare.txt" \
    --timing-only --min-steps "$min_steps" 2>&1 | tail -n 1 | tee -a "$OUT/timing_runs.log"
done
[ "${PROFILE:-1}" = 1 ] || exit 0
echo "== early-exit profile, d$d"
python scripts/early_exit_profile.py --checkpoint "$checkpoint" --data "$DATA/tinyshakespeare.txt" \
  --out "$OUT/profile_d$d.json" $([ "${SWEEP:-0}" = 1 ] && echo --sweep-attention-tiles) 2>&1 \
  | grep -E 'no_exit|exit {|wall_ms|pieces_gpu|idle_between|host_ms|fastest|speedup|Error'

if [ "${BENCH:-1}" = 1 ]; then
  echo "== early-exit benchmark, d$d"
  python scripts/early_exit_bench.py --checkpoint "$checkpoint" \
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
fi
