#!/bin/bash
# Issue 32: the compiled backward without the copies of h1/h3 (6296404) against the commit before (0df89a9) on one
# machine; a profile of the new compiled step; the compile and kernel GPU tests; then (last, may be cut off) the same
# bench with Inductor's CUDA graphs (TORCHINDUCTOR_CUDAGRAPHS=1) as a probe of the host's share of the step.
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
use() { (cd "$1" && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1); cut -c1-60 "$1/COMMIT"; }
B="moeflow bench train --shape olmoe-like --impls triton --steps 10 model.n_layers=4 trainer.compile=true optim.master_weights=true optim.moments_dtype=bfloat16"
show() { grep -E "tok/s|x0|rror|first step" | cut -c1-250; }
export TRITON_CACHE_DIR=/tmp/tc TORCHINDUCTOR_CACHE_DIR=/tmp/ic   # empty at the first bench
use .head
(cd .head && timeout 170 $B --variants moe,dense --out $OUT/compiled_moe_dense_head.json 2>&1 | show); echo "== at ${SECONDS}s"
use .base
(cd .base && timeout 100 $B --variants moe --out $OUT/compiled_moe_base.json 2>&1 | show); echo "== at ${SECONDS}s"
use .head
(cd .head && timeout 90 $B --variants moe --out $OUT/compiled_moe_profile_head.json trainer.profile=true 2>&1 | grep -E "tok/s|idle|experts|other|casts|optimizer|gemm|  " | cut -c1-200); echo "== at ${SECONDS}s"
(cd .head && timeout 110 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_compile_gpu.py tests/gpu/test_kernels_gpu.py -k "compile or routed or impls_agree" 2>&1 | tail -3); echo "== at ${SECONDS}s"
(cd .head && TORCHINDUCTOR_CUDAGRAPHS=1 timeout 140 $B --variants moe,dense --out $OUT/compiled_cudagraphs_head.json 2>&1 | grep -E "tok/s|x0|rror|first step|skipping|cudagraph" | cut -c1-250)
echo "== end at ${SECONDS}s"
