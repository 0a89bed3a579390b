#!/usr/bin/env bash
# The study: AdaFisherW (paper) vs AdaFisherW (official) vs AdamW, equal training wall-clock
# budget (lm.train_lm.time_budget_s = 150 in the configs), 2 seeds, one thread, runs one after
# another. Learning rates: the sweep's choice (docs/results/lm.md), passed here explicitly.
set -euo pipefail
export OMP_NUM_THREADS=1
OUT=${OUT:-runs/lm_study}
run() {  # config tag lr-selector lr seed
  echo "$(date +%T) load=$(cut -d' ' -f1 /proc/loadavg) $2 seed=$5"
  curvlab run "configs/$1.gin" --quiet --bind "$3=$4" --bind "lm.train_lm.seed=$5" \
    --out "$OUT/$2_seed$5"
}
for seed in 0 1; do
  run lm_stdlib_adamw adamw baselines.torch_optimizer.lr "${ADAMW_LR:?}" "$seed"
  run lm_stdlib_adafisherw adafisherw_paper optimizer.lr "${PAPER_LR:?}" "$seed"
  run lm_stdlib_adafisherw_official adafisherw_official optimizer.lr "${OFFICIAL_LR:?}" "$seed"
done
python -m curvlab.experiments.train_lm "$OUT" --sweep "${SWEEP:-runs/lm_sweep}" --out docs/results/lm
