#!/usr/bin/env bash
# Train the default config once per gate and print each run's routing table.
# Usage: bench/gates.sh OUT_DIR [extra overrides...]   (records go to bench/RESULTS.md, section "Gates")
set -uo pipefail
out=${1:?usage: bench/gates.sh OUT_DIR [overrides...]}; shift
for g in topk expert_choice dts dts_act sinkhorn ssr hash; do
  start=$(date +%s)
  moeflow train gate=$g trainer.steps=300 trainer.progress=false hydra.run.dir="$out/$g" "$@"
  echo "$g wall_s=$(( $(date +%s) - start ))" | tee -a "$out/wall.txt"
  moeflow stats "$out/$g"
done
