#!/bin/bash
# Issue 32 tooling on the GPU: GPU tests, bench train cold vs warm autotune cache, phase times.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
export TRITON_CACHE_DIR=/tmp/tc
echo "== GPU tests"; timeout 180 python3 -m pytest -q -x -p no:cacheprovider tests/gpu 2>&1 | tail -6
rm -rf /tmp/tc
echo "== cold (empty Triton cache): moe triton + dense, eager"
timeout 220 moeflow bench train --shape olmoe-like --variants moe,dense --impls triton --steps 10 model.n_layers=4 --out $OUT/train_h100.json 2>&1 | tail -8
echo "cached tunings: $(ls /tmp/tc/*/moeflow-*.autotune.json 2>/dev/null | wc -l)"
echo "== warm (same cache): moe triton"
timeout 120 moeflow bench train --shape olmoe-like --variants moe --impls triton --steps 5 model.n_layers=4 --out $OUT/train_h100_warm.json 2>&1 | tail -4
echo "== warm, cache off (MOEFLOW_AUTOTUNE_CACHE=0)"
MOEFLOW_AUTOTUNE_CACHE=0 timeout 120 moeflow bench train --shape olmoe-like --variants moe --impls triton --steps 5 model.n_layers=4 --out $OUT/train_h100_nocache.json 2>&1 | tail -4
