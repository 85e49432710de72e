#!/bin/bash
# Issue 32: the GPU tests and the documented `moeflow bench train` at the clean export of 449ff69 (.head):
# OLMoE-like (the preset's 8 layers) MoE and its dense twin, eager and compiled, in one run; then the
# Mixtral-like shape if time remains. Whole script within 570 s; full logs under $OUT.
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== setup done at ${SECONDS}s"
echo "== GPU tests"; timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu > $OUT/tests.log 2>&1; echo "rc=$?"
grep -E "passed|failed|FAILED|[0-9]+ error" $OUT/tests.log | tail -8
echo "== tests done at ${SECONDS}s"
t=$(( 565 - SECONDS )); [ $t -gt 220 ] && t=220
echo "== bench olmoe-like: moe + dense, eager + compiled (timeout ${t}s)"
timeout $t moeflow bench train --shape olmoe-like --variants moe,dense --impls triton --steps 5 --compile --out $OUT/train_olmoe.json > $OUT/olmoe.log 2>&1; rc=$?; echo "rc=$rc"
grep -E "tok/s|x[0-9]\.|rror|wrote" $OUT/olmoe.log | grep -v "^ *File " | tail -12
[ $rc -ne 0 ] && { echo "-- last lines:"; tail -4 $OUT/olmoe.log | cut -c1-400; }
echo "== olmoe done at ${SECONDS}s"
t=$(( 565 - SECONDS )); [ $t -gt 150 ] && t=150
if [ $t -ge 30 ]; then
  echo "== bench mixtral-like: moe + dense, eager + compiled (timeout ${t}s)"
  timeout $t moeflow bench train --shape mixtral-like --variants moe,dense --impls triton --steps 5 --compile --out $OUT/train_mixtral.json > $OUT/mixtral.log 2>&1; rc=$?; echo "rc=$rc"
  grep -E "tok/s|x[0-9]\.|rror|wrote" $OUT/mixtral.log | grep -v "^ *File " | tail -12
  [ $rc -ne 0 ] && { echo "-- last lines:"; tail -4 $OUT/mixtral.log | cut -c1-400; }
else
  echo "== mixtral-like skipped: ${t}s left"
fi
echo "== end at ${SECONDS}s"
