#!/bin/bash
# Issue 32: optim.master_remainders (the fp32 master kept as its low 16 bits beside the bf16 weight) against
# full fp32 masters, compiled MoE and dense twin at the OLMoE-like 4-layer shape, A/B/A on one machine; and the
# kernel's GPU tests. Carry [".whl", ".head"]. Written 2026-12-07 (seventh session), not yet run.
# Prediction: AdamW reads + writes 18 B per parameter instead of 20: 1.88B x 2 B = 3.8 GB less at ~3.0 TB/s,
# -1.3 ms in the MoE optimizer phase (14.5 -> ~13.2 ms), -0.3 ms for the dense twin (0.47B); MoE/dense ~x0.79
# (run40: x0.784); peak memory -3.5 GiB for the MoE (28.1 -> ~24.6 GiB), -0.9 GiB dense. Forward and backward
# unchanged (the same bf16 weights but at ties).
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; cut -c1-60 COMMIT
export TRITON_CACHE_DIR=/tmp/tc TORCHINDUCTOR_CACHE_DIR=/tmp/ic
B="moeflow bench train --shape olmoe-like --variants moe,dense --impls triton --steps 10 model.n_layers=4 trainer.compile=true optim.master_weights=true optim.moments_dtype=bfloat16"
show() { grep -E "tok/s|x0|rror|first step" | cut -c1-250; }
timeout 80 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels_gpu.py -k "adamw or halves or bf16_moments" 2>&1 | tail -3; echo "== at ${SECONDS}s"
timeout 150 $B --out $OUT/train_h100_full_masters_a.json 2>&1 | show; echo "== at ${SECONDS}s"
timeout 110 $B optim.master_remainders=true --out $OUT/train_h100_master_remainders.json 2>&1 | show; echo "== at ${SECONDS}s"
[ "$SECONDS" -lt 470 ] && timeout 110 $B --out $OUT/train_h100_full_masters_b.json 2>&1 | show
echo "== end at ${SECONDS}s"
