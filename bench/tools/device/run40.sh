#!/bin/bash
# Issue 32: the compiled backward without the copies of h1/h3 (.head) against the commit before (.base = 0df89a9) on
# one machine; the compile and kernel GPU tests; a profile of the new compiled step. Written 2026-12-07 (fifth
# session), not yet run: no machine could be started that session.
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$GPU"
use() { (cd "$1" && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1); cut -c1-60 "$1/COMMIT"; }
B="moeflow bench train --shape olmoe-like --impls triton --steps 10 model.n_layers=4 trainer.compile=true optim.master_weights=true optim.moments_dtype=bfloat16"
show() { grep -E "tok/s|x0|rror|first step" | cut -c1-250; }
prof() { grep -E "tok/s|idle|experts|other|casts|optimizer|gemm|_kernel|  " | cut -c1-200; }
export TRITON_CACHE_DIR=/tmp/tc TORCHINDUCTOR_CACHE_DIR=/tmp/ic   # empty at the first bench
use .head
(cd .head && timeout 170 $B --variants moe,dense --out $OUT/compiled_moe_dense_head.json 2>&1 | show); echo "== at ${SECONDS}s"
use .base
(cd .base && timeout 100 $B --variants moe --out $OUT/compiled_moe_base.json 2>&1 | show); echo "== at ${SECONDS}s"
use .head
(cd .head && timeout 80 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_compile_gpu.py tests/gpu/test_kernels_gpu.py -k "compile or routed" 2>&1 | tail -3); echo "== at ${SECONDS}s"
(cd .head && timeout 90 $B --variants moe --out $OUT/compiled_moe_profile_head.json trainer.profile=true 2>&1 | prof); echo "== at ${SECONDS}s"
echo "== end at ${SECONDS}s"
