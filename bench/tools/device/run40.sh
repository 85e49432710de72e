#!/bin/bash
# Issue 32: the compiled backward without the copies of h1/h3 (6296404) against the commit before (0df89a9), A/B/A on one
# machine; a profile of the new compiled step; the compile and kernel GPU tests.
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
use() { (cd "$1" && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1); cut -c1-60 "$1/COMMIT"; }
B="moeflow bench train --shape olmoe-like --impls triton --steps 10 model.n_layers=4 trainer.compile=true optim.master_weights=true optim.moments_dtype=bfloat16"
show() { grep -E "tok/s|x0|rror|first step" | cut -c1-250; }
export TRITON_CACHE_DIR=/tmp/tc TORCHINDUCTOR_CACHE_DIR=/tmp/ic   # empty at the first bench
use .head
(cd .head && timeout 200 $B --variants moe,dense --out $OUT/compiled_moe_dense_head.json 2>&1 | show)
use .base
(cd .base && timeout 120 $B --variants moe --out $OUT/compiled_moe_base.json 2>&1 | show)
use .head
(cd .head && timeout 100 $B --variants moe --out $OUT/compiled_moe_head2.json 2>&1 | show)
(cd .head && timeout 100 $B --variants moe --out $OUT/compiled_moe_profile_head.json trainer.profile=true 2>&1 | grep -E "tok/s|idle|experts|other|casts|optimizer|gemm" | cut -c1-200)
(cd .head && timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_compile_gpu.py tests/gpu/test_kernels_gpu.py 2>&1 | tail -3)
echo "== end at ${SECONDS}s"
