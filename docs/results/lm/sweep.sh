#!/usr/bin/env bash
# Learning-rate sweep on the validation split only (test split never evaluated: evaluate_test=False).
# Equal step count (200 steps, seed 0) so that the choice does not depend on the machine's load.
set -euo pipefail
export OMP_NUM_THREADS=1
OUT=${OUT:-runs/lm_sweep}
COMMON=(--quiet --bind lm.train_lm.time_budget_s=None --bind lm.train_lm.steps=200
        --bind lm.train_lm.evaluate_test=False --bind lm.train_lm.seed=0)
run() {  # config tag lr-selector lr
  echo "$(date +%T) load=$(cut -d' ' -f1 /proc/loadavg) $2 lr=$4"
  curvlab run "configs/$1.gin" "${COMMON[@]}" --bind "$3=$4" --out "$OUT/$2_lr$4"
}
for lr in ${ADAMW_LRS:-1e-3 3e-3 1e-2}; do
  run lm_stdlib_adamw adamw baselines.torch_optimizer.lr "$lr"; done
for lr in ${PAPER_LRS:-3e-4 1e-3 3e-3}; do
  run lm_stdlib_adafisherw adafisherw_paper optimizer.lr "$lr"; done
for lr in ${OFFICIAL_LRS:-1e-4 3e-4 1e-3}; do
  run lm_stdlib_adafisherw_official adafisherw_official optimizer.lr "$lr"; done
