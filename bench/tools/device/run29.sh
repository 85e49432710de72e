#!/bin/bash
# Issue 32, call 3: the cold first compiled step per scope (one process each, fresh Inductor/Triton caches).
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
for m in datasets torchdata tyro einops tensorboard torchtitan transformers pyarrow; do python3 -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>&1 | tail -1 | cut -c1-120; done
cat COMMIT; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for SC in "each block" "whole model"; do
  echo "== cold compile: $SC (at ${SECONDS}s)"
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d) timeout 170 python3 bench/tools/compile_breakdown.py --preset olmoe_1b_7b --layers 4 --scopes "$SC" > $OUT/scope_${SC// /_}.log 2>&1; echo "rc=$?"
  grep -E "first step|explain|compile_inner|fw_compiler_base|graph|break" $OUT/scope_${SC// /_}.log | cut -c1-200 | tail -12
done
echo "== end at ${SECONDS}s"
