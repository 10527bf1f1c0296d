#!/usr/bin/env bash
# The issue-6 training runs: the `small` preset on tinyshakespeare (byte tokenizer) and on neko (a
# SentencePiece model trained here by `train-spm`), each under a wall-time budget.
# usage: scripts/train_runs.sh OUT_DIR [DATA_DIR]   (DATA_DIR defaults to ../shared/data)
# env: MINUTES (10), SEQ_LEN (256), BATCH (64), LR (1e-3), SPM_VOCAB (4000), DROPOUT (0.1),
# WEIGHT_DECAY (0.01), EMA_DECAY (0.995), ADAM_BETA2 (0.999), WARMUP (200), RANDOM_WINDOWS (0; 1: --random-windows),
# RUNS ("shakespeare neko"), PARALLEL (0: one after the other; 1: both at once, sharing the device).
set -euo pipefail
OUT=${1:?usage: scripts/train_runs.sh OUT_DIR [DATA_DIR]}
DATA=${2:-../shared/data}
MINUTES=${MINUTES:-10} SEQ_LEN=${SEQ_LEN:-256} BATCH=${BATCH:-64} LR=${LR:-1e-3} SPM_VOCAB=${SPM_VOCAB:-4000}
mkdir -p "$OUT"
case " ${RUNS:-neko} " in *" neko "*)
  python -m trm_fast train-spm --input "$DATA/neko.txt" --model-prefix "$OUT/neko_spm" --vocab-size "$SPM_VOCAB";;
esac

run() {  # name data tokenizer
  python -m trm_fast train --data "$2" --tokenizer "$3" --pack --preset small --seq-len "$SEQ_LEN" \
    --batch-size "$BATCH" --lr "$LR" --weight-decay "${WEIGHT_DECAY:-0.01}" --ema-decay "${EMA_DECAY:-0.995}" \
    --adam-beta2 "${ADAM_BETA2:-0.999}" --warmup-steps "${WARMUP:-200}" \
    $([ "${RANDOM_WINDOWS:-0}" = 1 ] && echo --random-windows) \
    --minutes "$MINUTES" --eval-every 250 --eval-batches 40 --log-every 50 --set "dropout=${DROPOUT:-0.1}" \
    --out "$OUT/$1" --summary "$OUT/$1.json" > "$OUT/$1.log" 2>&1
}
declare -A DATA_OF=([shakespeare]="$DATA/tinyshakespeare.txt" [neko]="$DATA/neko.txt")
declare -A TOKENIZER_OF=([shakespeare]=byte [neko]="$OUT/neko_spm.model")
for name in ${RUNS:-shakespeare neko}; do
  if [ "${PARALLEL:-0}" = 1 ]; then run "$name" "${DATA_OF[$name]}" "${TOKENIZER_OF[$name]}" &
  else run "$name" "${DATA_OF[$name]}" "${TOKENIZER_OF[$name]}"; fi
done
wait
for name in ${RUNS:-shakespeare neko}; do tail -n 3 "$OUT/$name.log"; done
