#!/bin/bash
# Issue 32: MoE vs dense compiled in one run after the dense twin's per-micro-batch sync went (a CPU zero aux loss).
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; cut -c1-60 COMMIT; nvidia-smi --query-gpu=name --format=csv,noheader
timeout 170 moeflow bench train --shape olmoe-like --variants moe,dense --impls triton --steps 10 model.n_layers=4 trainer.compile=true optim.master_weights=true optim.moments_dtype=bfloat16 --out $OUT/compiled_moe_dense.json 2>&1 | grep -E "tok/s|x0|rror" | cut -c1-250
timeout 40 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_batch_to_device_gpu.py 2>&1 | tail -1
echo "== end at ${SECONDS}s"
