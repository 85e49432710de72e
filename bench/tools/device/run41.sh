#!/bin/bash
# Issue 32 on an H200: the 8-layer OLMoE-like shape, MoE vs dense compiled (bench/results/train_h200.json), and
# loss parity over 200 steps for the Mixtral-like and 128-expert shapes: the default path (fp32 weights and AdamW
# moments) against the bench's master weights + bf16 moments, same seed.
# Written 2026-12-07 (fifth session), not yet run: no H200 came that session or the next. The parity table is
# bench/tools/compare_runs.py (since the seventh session), the one the other scripts could share.
# Usage: bash run41.sh [bench|parity|all] (default all; each half fits one 10-minute call, both do not).
set -u -o pipefail
PART=${1:-all}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; cut -c1-60 COMMIT
export TRITON_CACHE_DIR=/tmp/tc TORCHINDUCTOR_CACHE_DIR=/tmp/ic
[ "$PART" != parity ] && timeout 240 moeflow bench train --shape olmoe-like --variants moe,dense --impls triton --steps 10 trainer.compile=true optim.master_weights=true optim.moments_dtype=bfloat16 --out $OUT/train_h200.json 2>&1 | grep -E "tok/s|x0|rror|first step" | cut -c1-250
[ "$PART" = bench ] && { echo "== end at ${SECONDS}s"; exit 0; }
COMMON="data=stdlib data.seq_len=2048 data.batch_size=4 model.max_seq_len=2048 trainer.steps=200 trainer.log_every=10 trainer.eval_every=0 trainer.ckpt_every=0 trainer.progress=false experts.impl=triton"
MIX="model=mixtral_8x7b model.n_layers=4"
E128="model=qwen3_30b_a3b model.n_layers=8 trainer.activation_checkpointing=full"
FAST="optim.master_weights=true optim.moments_dtype=bfloat16"
for run in "mix_default|$MIX" "mix_fast|$MIX $FAST" "e128_default|$E128" "e128_fast|$E128 $FAST"; do
  name=${run%%|*}; args=${run#*|}
  echo "== $name"; timeout 110 moeflow train $args $COMMON hydra.run.dir=/tmp/p_$name 2>&1 | grep -E "done|rror|memory" | cut -c1-200
done
for shape in mix e128; do python3 bench/tools/compare_runs.py /tmp/p_${shape}_default/tensorboard /tmp/p_${shape}_fast/tensorboard; done
echo "== end at ${SECONDS}s"
