#!/bin/bash
# Issues 32/34 at the clean export of 82fd405 (.head): the GPU tests (first run of tests/gpu/test_context_parallel_gpu.py),
# then `moeflow bench train` at the Mixtral-like and 128-expert shapes (eager, moe vs dense) on the H200.
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== GPU tests at ${SECONDS}s"
timeout 230 python3 -m pytest -q -p no:cacheprovider tests/gpu > $OUT/tests.log 2>&1; echo "rc=$?"
grep -E "passed|failed|FAILED|[0-9]+ error" $OUT/tests.log | tail -8 | cut -c1-300
for SH in mixtral-like e128; do
  t=$(( 575 - SECONDS )); [ $t -lt 60 ] && break
  echo "== bench train --shape $SH (timeout ${t}s, at ${SECONDS}s)"
  timeout $t moeflow bench train --shape $SH --variants moe,dense --impls triton --steps 5 --out $OUT/train_$SH.json > $OUT/bench_$SH.log 2>&1; echo "rc=$?"
  grep -vE "^\s*$" $OUT/bench_$SH.log | tail -14 | cut -c1-250
done
echo "== end at ${SECONDS}s"
