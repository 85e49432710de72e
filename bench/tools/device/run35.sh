#!/bin/bash
# Issue 32: the host running ahead (pinned, non-blocking batch copy; no CPU scalars in the compiled graph) at
# .head vs .base (01d9fdc, the commit before): compiled MoE vs dense in one run with empty caches (cold first
# step), the profile's idle line, eager A/B/A, a warm compile profile, and the GPU test of the copy.
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
R=$(pwd)
use() { cd $R/$1 && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; echo "-- $(cut -c1-60 COMMIT)"; }
use .head
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_batch_to_device_gpu.py 2>&1 | tail -1
B="moeflow bench train --shape olmoe-like --impls triton --steps 10 model.n_layers=4 optim.master_weights=true optim.moments_dtype=bfloat16"
export TRITON_CACHE_DIR=/tmp/c5t TORCHINDUCTOR_CACHE_DIR=/tmp/c5i
echo "== head: compiled MoE and dense, empty caches (at ${SECONDS}s)"
timeout 240 $B --variants moe,dense trainer.compile=true --out $OUT/compiled_moe_dense_head.json 2>&1 | grep -E "tok/s|x0|rror" | cut -c1-250
echo "== head: compiled MoE profiled (at ${SECONDS}s)"
timeout 120 $B --variants moe trainer.compile=true trainer.profile=true --out $OUT/compiled_profile_head.json 2>&1 | grep -E "^GPU idle|tok/s|rror" | cut -c1-300
for side in head base head; do
  use .$side; echo "== $side: eager MoE (at ${SECONDS}s)"
  timeout 80 $B --variants moe --out $OUT/eager_${side}_${SECONDS}.json 2>&1 | grep -E "tok/s|rror" | cut -c1-250
done
echo "== head: warm compile, cProfile (at ${SECONDS}s)"
timeout 150 python3 bench/tools/compile_breakdown.py --scopes "whole model" --profile-compile 30 --profile-out $OUT/compile_warm.prof 2>&1 | grep -E "first step|generated|compile_inner|fw_compiler_base|call_user_compiler" | cut -c1-200
echo "== end at ${SECONDS}s"
