#!/usr/bin/env bash
# Issue 7 on the GPU: train models on the synthetic task suite (scripts/task_vectors.py --train-only, the
# `small` preset), one process per seed, side by side (a model this small keeps the host busy, not the GPU),
# and keep each one's weights and EMA weights, without optimizer state, as $OUT/model_seed<S>.pt. Evaluate
# them on the CPU: python scripts/task_vectors.py --checkpoint model_seed<S>.pt
#   device run: SEEDS="4 5 6" MINUTES=4.5 OUT=$OUT bash scripts/gpu_task_vector_models.sh
set -uo pipefail
OUT=${OUT:-/tmp/trm_fast_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SEEDS=${SEEDS:-1 2 3}
status=0
pids=()
for seed in $SEEDS; do
  python3 scripts/task_vectors.py --preset small --minutes "${MINUTES:-4.5}" --train-only --seed "$seed" \
    --out "/tmp/task_vectors_seed$seed" > "/tmp/task_vectors_seed$seed.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for seed in $SEEDS; do
  echo "== seed $seed: $(tail -n 1 "/tmp/task_vectors_seed$seed/metrics.jsonl" 2>/dev/null)"
  tail -n 2 "/tmp/task_vectors_seed$seed.log"
  python3 - "$seed" "$OUT" <<'EOF' || status=1
import sys
import torch
seed, out = sys.argv[1:]
checkpoint = torch.load(f"/tmp/task_vectors_seed{seed}/checkpoint.pt", map_location="cpu", weights_only=False)
checkpoint["optimizer"] = None
torch.save(checkpoint, f"{out}/model_seed{seed}.pt")
EOF
done
exit $status
