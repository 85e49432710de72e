#!/bin/bash
# Issue 32, call A on a FRESH machine: the first step with the shipped H100 picks (eager, then compiled, each
# with empty caches), and a second compiled process on the warm caches with Inductor's/AOT's cache hits counted.
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
cat COMMIT | cut -c1-80; nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import triton; print('triton', triton.__version__)"
ls ~/.triton/cache 2>/dev/null | wc -l
B="moeflow bench train --shape olmoe-like --variants moe --impls triton --steps 5 model.n_layers=4 optim.master_weights=true optim.moments_dtype=bfloat16"
echo "== eager, shipped picks, empty caches (at ${SECONDS}s)"
TRITON_CACHE_DIR=/tmp/tc1 TORCHINDUCTOR_CACHE_DIR=/tmp/ic1 timeout 150 $B --out $OUT/eager_cold_shipped.json 2>&1 | grep -vE "^\s*$" | tail -6 | cut -c1-250
echo "== compiled, shipped picks, empty caches (at ${SECONDS}s)"
TRITON_CACHE_DIR=/tmp/tc2 TORCHINDUCTOR_CACHE_DIR=/tmp/ic2 timeout 220 $B trainer.compile=true --out $OUT/compiled_cold_shipped.json 2>&1 | grep -vE "^\s*$" | tail -6 | cut -c1-250
echo "== compiled, second process on those caches (at ${SECONDS}s)"
TORCH_LOGS=inductor,aot TRITON_CACHE_DIR=/tmp/tc2 TORCHINDUCTOR_CACHE_DIR=/tmp/ic2 timeout 200 $B trainer.compile=true --out $OUT/compiled_warm.json > /tmp/warm.log 2>&1
grep -E "tok/s|first" /tmp/warm.log | tail -4 | cut -c1-250
grep -iE "cache hit|cache miss|bypass" /tmp/warm.log | sed -E 's/.*\] //; s/ for key.*//; s/(bypass[^:]*:).*/\1/' | sort | uniq -c | sort -rn | head -8 | cut -c1-250
echo "== end at ${SECONDS}s"
