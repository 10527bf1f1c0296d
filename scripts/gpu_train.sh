#!/usr/bin/env bash
# Issue 6 on the GPU machine, in one call: install (sentencepiece from .wheels/ when there is no network),
# the data / training / CLI tests on CUDA, then scripts/train_runs.sh (tinyshakespeare + neko, `small`
# preset, MINUTES each; RUNS, SEQ_LEN, BATCH, WEIGHT_DECAY, EMA_DECAY pass through) once per value of DROPOUTS, all at once, sharing the GPU.
# Results go to $OUT/train-dropout<d>/. usage: OUT=/some/dir DATA=.data DROPOUTS="0.2 0.3" bash scripts/gpu_train.sh
set -uo pipefail
OUT=${OUT:?set OUT} DATA=${DATA:-../shared/data}
python -c "import sentencepiece" 2>/dev/null || python -m pip install -q --no-index --find-links .wheels sentencepiece
export PYTHONPATH=$PWD  # training needs no compiled extension: run from the source tree, no build
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
[ "${SKIP_TESTS:-0}" = 1 ] || python -m pytest tests/test_data.py tests/test_training.py tests/test_cli.py -q 2>&1 | tail -4
for dropout in ${DROPOUTS:-0.1}; do
  DROPOUT=$dropout MINUTES=${MINUTES:-7.5} PARALLEL=1 bash scripts/train_runs.sh "$OUT/train-dropout$dropout" "$DATA" &
done
wait
for run in "$OUT"/train-dropout*/shakespeare; do
  python -m trm_fast generate --checkpoint "$run/best.pt" --prompt "ROMEO:" --max-new-tokens 300 --top-k 10 \
    --seed 0 --no-halting > "$run/sample.txt" 2>&1
done
tar czf "$OUT/train.tgz" -C "$OUT" --exclude='*.pt' $(cd "$OUT" && ls -d train-dropout*)  # $OUT holds 8 files at most
rm -rf "$OUT"/train-dropout*
