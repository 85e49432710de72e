#!/bin/bash
# Issue 32, session 3 call 2: the bf16-moment kernel with one Philox draw (eager, optimizer phase vs fp32 moments, same
# run); where the compiled MoE step leaves the GPU idle (trainer.profile=true's new idle line), MoE and dense; e128 with
# full activation checkpointing (OOM'd at 12 B/param without it on an H100).
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
cat COMMIT; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels_gpu.py -k "master_weight or bf16_moments" 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -6 | cut -c1-300
B="moeflow bench train --shape olmoe-like --variants moe --impls triton --steps 10 model.n_layers=4 optim.master_weights=true"
for M in bfloat16 float32; do
  echo "== eager, master weights, moments $M (at ${SECONDS}s)"
  timeout 150 $B optim.moments_dtype=$M --out $OUT/eager_$M.json --force 2>&1 | grep -E "tok/s|rror" | tail -3 | cut -c1-250
done
t=$(( 300 - SECONDS )); echo "== compiled + profile, moe,dense (timeout ${t}s, at ${SECONDS}s)"
timeout $t moeflow bench train --shape olmoe-like --variants moe,dense --impls triton --steps 8 model.n_layers=4 trainer.compile=true optim.master_weights=true trainer.profile=true --out $OUT/compiled_profile.json > $OUT/compiled_profile.log 2>&1; echo "rc=$?"
grep -E "tok/s|GPU idle|wall|^total|x0" $OUT/compiled_profile.log | cut -c1-400
t=$(( 430 - SECONDS )); echo "== e128, master weights + bf16 moments + full AC (timeout ${t}s, at ${SECONDS}s)"
[ $t -gt 60 ] && timeout $t moeflow bench train --shape e128 --variants moe,dense --impls triton --steps 5 optim.master_weights=true optim.moments_dtype=bfloat16 trainer.activation_checkpointing=full --out $OUT/train_e128.json > $OUT/bench_e128.log 2>&1; echo "rc=$?"
grep -vE "^\s*$" $OUT/bench_e128.log | grep -vi warn | tail -6 | cut -c1-400
echo "== end at ${SECONDS}s"
