#!/bin/bash
# Issues 31/34 at the clean export of e07c202 (.head): engine=megatron vs engine=torch on CUDA (initial weights now
# built on the same device), peak memory of a cp=1 step at seq 8k/16k/32k (the baseline for context parallelism),
# then the GPU tests with whatever time is left.
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "== megatron-core on CUDA at ${SECONDS}s"
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/distributed/test_megatron_core.py -k "gpt_model or trains_like or native" > $OUT/megatron.log 2>&1; echo "rc=$?"
grep -E "passed|failed|FAILED|[0-9]+ error|Error" $OUT/megatron.log | tail -6 | cut -c1-400
for S in 8192 16384 32768; do
  echo "== seq $S, cp=1: olmoe_1b_7b 2 layers, batch 1, 3 steps (at ${SECONDS}s)"
  timeout 80 moeflow train model=olmoe_1b_7b model.n_layers=2 model.max_seq_len=32768 data.seq_len=$S data.batch_size=1 trainer.steps=3 trainer.log_every=1 trainer.eval_every=0 trainer.ckpt_every=0 trainer.progress=false hydra.run.dir=/tmp/seq$S > $OUT/seq$S.log 2>&1; echo "rc=$?"
  grep -E "step [0-9]+/3|rror" $OUT/seq$S.log | grep -v "^ *File " | tail -3 | cut -c1-300
done
t=$(( 560 - SECONDS )); echo "== GPU tests (timeout ${t}s, at ${SECONDS}s)"
[ $t -gt 30 ] && { timeout $t python3 -m pytest -q -p no:cacheprovider tests/gpu > $OUT/tests.log 2>&1; echo "rc=$?"; grep -E "passed|failed|FAILED|[0-9]+ error" $OUT/tests.log | tail -8; tail -c 300 $OUT/tests.log; }
echo "== end at ${SECONDS}s"
