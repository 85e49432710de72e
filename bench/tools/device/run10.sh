#!/bin/bash
# Issue 32, last call: all GPU tests (the NaN fix of the fused cross-entropy), then MoE and its dense twin,
# eager and compiled, both with optim.master_weights=true, in one run (the ratio at the same code).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== GPU tests"; timeout 110 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -6
echo "== bench: moe + dense, eager + compiled, master weights"; timeout 230 moeflow bench train --shape olmoe-like --variants moe,dense --impls triton --steps 5 --compile model.n_layers=4 optim.master_weights=true --out $OUT/train_h100_master_weights_vs_dense.json 2>&1 | grep -E "tok/s|x0|rror"
