#!/bin/bash
# Issue 32: is ~3 ms of the compiled MoE bench step outside the steady steps Python's garbage collector? The
# bench at .head with the collector on vs off (gc_probe.py), intervals of 10 and 30 steps, MoE and dense.
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
G=$(pwd)/.gpu/gc_probe.py
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; cut -c1-60 COMMIT
export TRITON_CACHE_DIR=/tmp/c6t TORCHINDUCTOR_CACHE_DIR=/tmp/c6i
B="bench train --shape olmoe-like --impls triton model.n_layers=4 optim.master_weights=true optim.moments_dtype=bfloat16 trainer.compile=true"
for v in moe dense; do for steps in 10 30; do for gc in on off; do
  echo "== $v steps=$steps gc=$gc (at ${SECONDS}s)"
  timeout 100 python3 $G $gc $B --variants $v --steps $steps --out $OUT/${v}_${steps}_gc_${gc}.json 2>&1 | grep -E "tok/s|^GC|rror" | cut -c1-250
done; done; done
echo "== end at ${SECONDS}s"
