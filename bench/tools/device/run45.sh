#!/bin/bash
# Issue 32: moeflow against torchtitan 0.2.2 (the version) in the same run, on one H100: the bench's
# torchtitan row (torchtitan's own Qwen3 MoE model at the OLMoE-like 4-layer shape, compiled by its own
# apply_compile with its loss, clipped as its trainer does) beside the compiled MoE row; and its GPU test.
# Carry [".whl", ".whl_titan", ".head"]: .whl_titan holds torchtitan and what the image lacks for it
# (tyro, docstring_parser, typeguard, torchdata, datasets, dill, multiprocess; pip download --no-deps
# --python-version 3.12 --only-binary=:all:). Written 2026-12-07 (sixth session), not yet run.
# Prediction (seventh session, before any run): torchtitan compiled near the 94.2k tok/s (fp32 weights and
# AdamW, autocast; its own 0.2.2 model). (a) moeflow's default compiled (fp32 weights and AdamW): ~110 ms a step,
# ~145-155k tok/s: the issue-time 120.6 ms (135.9k) less the log point's syncs (-5.8), the fresh backward (-2) and
# cross-entropy from bf16 logits / fused q/k norm (~-3); so ~1.5-1.65x torchtitan, at the 1.6x target's edge.
# (b) master weights + bf16 moments: 93-95 ms (run40: 93.1), ~172-176k tok/s, ~1.8-1.9x.
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl .whl_titan/*.whl 2>&1 | tail -2; export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; cut -c1-60 COMMIT
if ! python3 -c "from torchtitan.models.qwen3.model.model import Qwen3Model" 2>/tmp/titan.err; then
  echo "torchtitan is not importable here:"; tail -2 /tmp/titan.err
  python3 -m pip list 2>/dev/null | grep -i -E "^(pyarrow|pandas|huggingface.hub|fsspec|datasets) "; exit 1
fi
echo "torchtitan importable"
export TRITON_CACHE_DIR=/tmp/tc TORCHINDUCTOR_CACHE_DIR=/tmp/ic
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_bench_torchtitan_gpu.py 2>&1 | tail -4; echo "== at ${SECONDS}s"
# (a) moeflow's defaults (fp32 weights and AdamW moments, as torchtitan's) compiled, against torchtitan compiled
timeout 260 moeflow bench train --shape olmoe-like --variants moe,torchtitan --impls triton --steps 10 model.n_layers=4 trainer.compile=true --out $OUT/train_h100_vs_torchtitan.json 2>&1 | grep -E "tok/s|x[0-9]|rror|skipped|torchtitan" | cut -c1-250
echo "== at ${SECONDS}s"
# (b) moeflow with master weights + bf16 moments (the row lists what torchtitan does otherwise), if time is left
[ "$SECONDS" -lt 330 ] && timeout 240 moeflow bench train --shape olmoe-like --variants moe,torchtitan --impls triton --steps 10 model.n_layers=4 trainer.compile=true optim.master_weights=true optim.moments_dtype=bfloat16 --out $OUT/train_h100_vs_torchtitan_master_bf16m.json 2>&1 | grep -E "tok/s|x[0-9]|rror|skipped|torchtitan" | cut -c1-250
echo "== end at ${SECONDS}s"
