#!/bin/bash
# run21 trimmed to a 450 s call (device time short). Issues 32/33 at the clean export of HEAD (.head, commit in $OUT/commit): torch 2.11 pipeline + CP tests on the
# device's CPUs (background, gloo), the GPU kernel tests not yet run (incl. bf16 moments), then `moeflow bench train`
# olmoe-like 4 layers compiled, MoE vs dense, master weights with fp32 vs bf16 moments; then the compile breakdown.
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
cat COMMIT; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== torch 2.11, CPU/gloo: pipeline and context-parallel tests, in the background (at ${SECONDS}s)"
( CUDA_VISIBLE_DEVICES= timeout 260 python3 -m pytest -q -p no:cacheprovider -n 6 tests/unit/test_pipeline_stages.py \
  tests/distributed/test_pipeline.py tests/distributed/test_pp_launch.py tests/distributed/test_cp_launch.py > $OUT/pp211.log 2>&1; echo "rc=$?" >> $OUT/pp211.log ) &
BG=$!
echo "== GPU kernel tests (at ${SECONDS}s)"
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels_gpu.py -k "second_process or master_weight or fused_cross_entropy or bf16_moments" > $OUT/gpu.log 2>&1; echo "rc=$?"
grep -E "passed|failed|FAILED|[0-9]+ error|Error" $OUT/gpu.log | tail -8 | cut -c1-300
B="moeflow bench train --shape olmoe-like --variants moe --impls triton --steps 10 model.n_layers=4 trainer.compile=true optim.master_weights=true"
for M in float32 bfloat16; do
  t=$(( 330 - SECONDS )); [ $t -lt 60 ] && { echo "skip $M"; continue; }
  echo "== bench compiled, master weights, moments $M (timeout ${t}s, at ${SECONDS}s)"
  timeout $t $B optim.moments_dtype=$M --out $OUT/train_moments_$M.json > $OUT/bench_$M.log 2>&1; echo "rc=$?"
  grep -E "tok/s|x0|rror|fwd|phase|GiB" $OUT/bench_$M.log | tail -8 | cut -c1-250
done
echo "== waiting for the 2.11 CPU tests (at ${SECONDS}s)"; wait $BG
grep -E "passed|failed|FAILED|[0-9]+ error|Error:|rc=" $OUT/pp211.log | tail -12 | cut -c1-400
t=$(( 440 - SECONDS )); echo "== compile breakdown, olmoe-like 4 layers (timeout ${t}s, at ${SECONDS}s)"
[ $t -gt 60 ] && { timeout $t python3 bench/tools/compile_breakdown.py --preset olmoe_1b_7b --layers 4 > $OUT/compile.log 2>&1; echo "rc=$?"; grep -v "^\s*$" $OUT/compile.log | grep -vi warn | head -50 | cut -c1-250; }
echo "== end at ${SECONDS}s"
