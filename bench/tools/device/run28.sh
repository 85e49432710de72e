#!/bin/bash
# Issue 32, call 2: the Mixtral-like and 128-expert shapes, which fp32 AdamW state cannot fit on one 80 GB card
# (16 B/param), with master weights + bf16 moments (12 B/param): eager, MoE vs dense.
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
cat COMMIT; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for SH in mixtral-like e128; do
  END=290; [ $SH = e128 ] && END=580
  t=$(( END - SECONDS )); [ $t -lt 60 ] && { echo "skip $SH"; continue; }
  echo "== bench train --shape $SH, master weights + bf16 moments (timeout ${t}s, at ${SECONDS}s)"
  timeout $t moeflow bench train --shape $SH --variants moe,dense --impls triton --steps 5 optim.master_weights=true optim.moments_dtype=bfloat16 --out $OUT/train_$SH.json > $OUT/bench_$SH.log 2>&1; echo "rc=$?"
  grep -vE "^\s*$" $OUT/bench_$SH.log | grep -vi warn | tail -12 | cut -c1-250
done
echo "== end at ${SECONDS}s"
