#!/usr/bin/env bash
# Train the default config once per gate and print each run's routing table.
# Usage: bench/tools/gates.sh OUT_DIR STEPS [extra overrides...]   (results: bench/RESULTS.md, section "Gates")
# The DTS schedules anneal over the first 2/3 of the run.
set -uo pipefail
out=${1:?usage: bench/tools/gates.sh OUT_DIR STEPS [overrides...]}; steps=${2:-300}; shift 2 || shift
for g in ${GATES:-topk expert_choice dts dts_act sinkhorn ssr hash}; do
  extra=()
  case $g in dts|dts_act) extra=(gate.anneal_steps=$(( steps * 2 / 3 ))) ;; esac
  start=$(date +%s)
  moeflow train gate=$g trainer.steps=$steps trainer.eval_every=$(( steps / 2 )) trainer.progress=false hydra.run.dir="$out/$g" "${extra[@]}" "$@"
  echo "$g wall_s=$(( $(date +%s) - start ))" | tee -a "$out/wall.txt"
  moeflow stats "$out/$g"
done
