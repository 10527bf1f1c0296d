#!/usr/bin/env bash
# A/B of the Triton train step on the GPU machine: this tree against an older one, run alternately in fresh
# processes (ROUNDS times each), so that the machine's drift between runs falls on both alike. The older tree is
# a folder holding trm_fast/ with its kernels at trm_fast/kernels/; the extension built here is copied into it
# (so its csrc/ must match this tree's, else its ops fall back to torch), e.g. made here with
#   mkdir -p ab_old && git archive REV trm_fast kernels | tar -x -C ab_old && mv ab_old/kernels ab_old/trm_fast/
#   device run: OUT=$OUT OLD=ab_old bash scripts/gpu_ab_step.sh     (CASE, IMPLS, MODES as in gpu_train_step.sh)
# NEW, a folder like OLD, puts another tree in this tree's place (two changes measured apart in one session);
# OLD_ENV / NEW_ENV, "NAME=value ..." set for that tree's runs (e.g. OLD_ENV=TRM_FAST_LT_TUNE=0).
set -uo pipefail
OUT=${OUT:?set OUT}
OLD=${OLD:?set OLD}
CASE=${CASE:-B16-L512-d512}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -e . --no-build-isolation --no-deps > "$OUT/setup.log" 2>&1 || echo "build failed"
for tree in "$OLD" ${NEW:-}; do
  cp trm_fast/_C*.so "$tree/trm_fast/" 2>/dev/null || echo "no compiled extension to copy into $tree"
done
(cd /tmp && python3 -m trm_fast doctor | grep lt_matmul)
for round in $(seq "${ROUNDS:-2}"); do
  for tree in old new; do
    path=$([ $tree = old ] && realpath "$OLD" || ([ -n "${NEW:-}" ] && realpath "$NEW") || echo "")
    echo "== round $round, $tree tree"
    (cd /tmp && PYTHONPATH=$path python3 -c "import trm_fast.kernels.matmul as m; print(m.__file__)")
    tree_env=$([ $tree = old ] && echo "${OLD_ENV:-}" || echo "${NEW_ENV:-}")
    echo "   env: ${tree_env:-(none)}"
    env $tree_env PYTHONPATH=$path timeout "${STEP_TIMEOUT:-150}" python3 scripts/train_step_profile.py --case "$CASE" \
      --impls ${IMPLS:-triton-graph} --modes ${MODES:-train} --profile ${PROFILE-} \
      --json "$OUT/ab_${tree}_${round}.json" 2>&1 | grep -v "UserWarning\|_warn_once"
  done
done
