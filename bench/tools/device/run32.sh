#!/bin/bash
# The compiled MoE vs dense ratio at HEAD (bf16 moments, master weights, the log point's one copy), and the H100's
# autotuning picks at the OLMoE-like shape collected for shipping (bench/tools/ship_tuning.py).
set -u -o pipefail
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/tc
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
cat COMMIT | cut -c1-80; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 170 moeflow bench train --shape olmoe-like --variants moe,dense --impls triton --steps 10 model.n_layers=4 trainer.compile=true optim.master_weights=true optim.moments_dtype=bfloat16 --out $OUT/train_h100_compiled_bf16_head.json 2>&1 | grep -E "tok/s|x0|rror" | cut -c1-250
cp kernels/tuned_picks.json $OUT/tuned_picks.json && python3 bench/tools/ship_tuning.py --cache-dir /tmp/tc --out $OUT/tuned_picks.json
echo "== end at ${SECONDS}s"
