#!/usr/bin/env bash
# Issue 3's training parity: the same model, seed and data order trained for STEPS steps on the torch path
# and on the Triton op table (kernels="triton"); the final validation losses must agree within 2%.
# usage: OUT=/some/dir DATA=../shared/data STEPS=1000 bash scripts/triton_training_parity.sh
#   TRITON_ARGS: more arguments for the Triton run (e.g. --cuda-graph)
set -euo pipefail
OUT=${OUT:?set OUT} DATA=${DATA:-../shared/data} STEPS=${STEPS:-1000}
mkdir -p "$OUT"
for kernels in torch triton; do
  python -m trm_fast train --data "$DATA/tinyshakespeare.txt" --pack --preset small --kernels "$kernels" \
    --seq-len 256 --batch-size 32 --lr 1e-3 --max-steps "$STEPS" --eval-every "$STEPS" --eval-batches 20 \
    --seed 0 $([ "$kernels" = triton ] && echo "${TRITON_ARGS:-}") --out "$OUT/parity-$kernels" --summary "$OUT/parity-$kernels.json" > "$OUT/parity-$kernels.log" 2>&1
done
python - "$OUT" <<'PY'
import json, sys
torch_run, triton_run = (json.load(open(f"{sys.argv[1]}/parity-{k}.json")) for k in ("torch", "triton"))
gap = abs(triton_run["val_loss"] - torch_run["val_loss"]) / torch_run["val_loss"]
print(f"training parity: torch {torch_run['val_loss']:.4f} ({torch_run['elapsed']:.1f} s), "
      f"triton {triton_run['val_loss']:.4f} ({triton_run['elapsed']:.1f} s), gap {100 * gap:.2f}% "
      f"({'within' if gap <= 0.02 else 'OUTSIDE'} 2%)")
PY
