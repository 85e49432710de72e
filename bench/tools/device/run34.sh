#!/bin/bash
# Issue 32, call B (same machine, warm): where Inductor's cold compile goes (cProfile, empty caches), the fused
# AdamW's bandwidth per launch shape against a copy, and the GPU tests not yet run on a device.
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -c "import hydra" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
cd .head && (python3 -c "import moeflow" 2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1)
cat COMMIT | cut -c1-80; nvidia-smi --query-gpu=name --format=csv,noheader
echo "== compile breakdown, whole model, empty caches, cProfile (at ${SECONDS}s)"
TRITON_CACHE_DIR=/tmp/tc3 TORCHINDUCTOR_CACHE_DIR=/tmp/ic3 timeout 240 python3 bench/tools/compile_breakdown.py --scopes "whole model" --profile-compile 45 2>&1 | grep -vE "^\s*$" | cut -c1-200 | tail -75
echo "== AdamW launch shapes (at ${SECONDS}s)"
timeout 100 python3 bench/tools/adamw_blocks.py 2>&1 | tail -16
echo "== compiled MoE profiled: the top kernels per category (at ${SECONDS}s)"
TRITON_CACHE_DIR=/tmp/tc2 TORCHINDUCTOR_CACHE_DIR=/tmp/ic2 timeout 170 moeflow bench train --shape olmoe-like --variants moe --impls triton --steps 8 model.n_layers=4 trainer.compile=true optim.master_weights=true optim.moments_dtype=bfloat16 trainer.profile=true --out $OUT/compiled_profile.json 2>&1 | grep -vE "^\s*$" | tail -22 | cut -c1-250
echo "== GPU tests (at ${SECONDS}s)"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_log_point_gpu.py tests/gpu/test_kernels_gpu.py -k "log_point or one_copy or bf16 or master" 2>&1 | tail -3 | cut -c1-250
echo "== end at ${SECONDS}s"
