#!/bin/bash
# Issue 32: GPU tests touched by today's changes at .head (compiled scopes vs eager; impls agree and compile traces; the pinned copy).
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; cut -c1-60 COMMIT; nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_compile_gpu.py tests/gpu/test_batch_to_device_gpu.py tests/gpu/test_kernels_gpu.py -k "compile or scope or batch or agree" -rs 2>&1 | tail -6 | cut -c1-220
echo "== end at ${SECONDS}s"
