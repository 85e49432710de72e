#!/bin/bash
# Issue 32: compiled beside eager, with trainer.profile=true tables (same warm machine as run6: /tmp/tc kept).
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site TRITON_CACHE_DIR=/tmp/tc
python3 -c "import omegaconf" 2>/dev/null || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; }
timeout 560 moeflow bench train --shape olmoe-like --variants moe,dense --impls triton --steps 6 --compile model.n_layers=4 trainer.profile=true --out $OUT/train_h100_compile_profile.json 2>&1 | grep -v "^\s*$" | tail -80
