#!/bin/bash
# The log point's device reads: before (.base) and after (.head, routing stats in one copy, tied rows by fingerprint),
# eager MoE, master weights, same machine; step - phases is what the log point costs per step of a 10-step interval.
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
B="moeflow bench train --shape olmoe-like --variants moe --impls triton --steps 10 model.n_layers=4 optim.master_weights=true"
for T in .base .head .base .head; do
  t=$(( 230 - SECONDS )); [ $t -lt 30 ] && { echo "skip $T"; continue; }
  (cd $T && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1)
  echo "== $(cat $T/COMMIT | cut -c1-60) (at ${SECONDS}s)"
  (cd $T && timeout $t $B --out $OUT/logpoint_${T#.}_$SECONDS.json 2>&1 | grep -E "tok/s|rror" | tail -2 | cut -c1-250)
done
echo "== end at ${SECONDS}s"
