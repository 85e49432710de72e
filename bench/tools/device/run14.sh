#!/bin/bash
# Issue 31/32 check at the clean export of the one-parallelism-model commit (.head): the GPU tests, megatron-core
# on CUDA (its GPTModel tests, and engine=megatron under torchrun: megatron-core's own DDP + the plan's clipping),
# then `moeflow bench train` OLMoE-like 4 layers, MoE and dense twin, eager and compiled (the ratio in one run).
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== GPU tests"; timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu > $OUT/tests.log 2>&1; echo "rc=$?"
grep -E "passed|failed|FAILED|[0-9]+ error" $OUT/tests.log | tail -8
echo "== megatron-core on CUDA at ${SECONDS}s"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/distributed/test_megatron_core.py -k "gpt_model or trains_like or native" > $OUT/megatron.log 2>&1; echo "rc=$?"
grep -E "passed|failed|FAILED|[0-9]+ error" $OUT/megatron.log | tail -6
timeout 90 torchrun --standalone --nproc-per-node 1 -m moeflow.launch.cli train engine=megatron experts.impl=torch model.n_layers=2 model.d_model=64 model.n_heads=4 model.d_ff=64 model.num_experts=4 data.max_bytes=200000 data.batch_size=4 data.seq_len=32 trainer.grad_accum=2 trainer.steps=6 trainer.log_every=1 trainer.eval_every=0 trainer.progress=false hydra.run.dir=/tmp/megatron_run > $OUT/megatron_train.log 2>&1; echo "rc=$?"
grep -E "step|rror" $OUT/megatron_train.log | grep -v "^ *File " | tail -8 | cut -c1-300
t=$(( 565 - SECONDS )); [ $t -gt 240 ] && t=240
echo "== bench olmoe-like 4 layers: moe + dense, eager + compiled (timeout ${t}s, at ${SECONDS}s)"
timeout $t moeflow bench train --shape olmoe-like --variants moe,dense --impls triton --steps 5 --compile model.n_layers=4 --out $OUT/train_olmoe4.json > $OUT/olmoe.log 2>&1; rc=$?; echo "rc=$rc"
grep -E "tok/s|x[0-9]\.|rror|wrote" $OUT/olmoe.log | grep -v "^ *File " | tail -12
[ $rc -ne 0 ] && { echo "-- last lines:"; tail -4 $OUT/olmoe.log | cut -c1-400; }
echo "== end at ${SECONDS}s"
