#!/bin/bash
# Issue 32, call 1: the fixed bf16-moment kernel's GPU test; both compile scopes follow eager; bench compiled with master
# weights, bf16 vs fp32 moments, MoE and its dense twin in the same process (the ratio).
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
cat COMMIT; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels_gpu.py -k "master_weight or bf16_moments" 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -6 | cut -c1-300
echo "== at ${SECONDS}s"
B="moeflow bench train --shape olmoe-like --variants moe,dense --impls triton --steps 10 model.n_layers=4 trainer.compile=true optim.master_weights=true"
for M in bfloat16 float32; do
  t=$(( 440 - SECONDS )); [ $t -lt 60 ] && { echo "skip $M"; continue; }
  echo "== bench compiled, master weights, moments $M (timeout ${t}s, at ${SECONDS}s)"
  timeout $t $B optim.moments_dtype=$M --out $OUT/train_moments_$M.json > $OUT/bench_$M.log 2>&1; echo "rc=$?"
  grep -E "tok/s|x0|x1|rror|first|peak" $OUT/bench_$M.log | tail -10 | cut -c1-250
done
t=$(( 580 - SECONDS )); echo "== compile scopes test (timeout ${t}s, at ${SECONDS}s)"
[ $t -gt 40 ] && timeout $t python3 -m pytest -q -s -p no:cacheprovider tests/gpu/test_compile_gpu.py 2>&1 | grep -E "first step|passed|failed|FAILED|Error" | tail -6 | cut -c1-300
echo "== end at ${SECONDS}s"
