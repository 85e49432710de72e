#!/bin/bash
# Issue 32 on one H100, from a clean export of HEAD (.head) and of 2e7f62a (.base, before the q/k-norm fix):
# GPU tests; eager before/after; fused vs torch cross-entropy; compiled default vs optim.master_weights;
# then 200-step loss parity, default vs master weights, same seed and data.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
export TRITON_CACHE_DIR=/tmp/tc
nvidia-smi --query-gpu=name --format=csv,noheader
B="moeflow bench train --shape olmoe-like --variants moe --impls triton --steps 10 model.n_layers=4"
(cd .base && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1)
echo "== before (2e7f62a), eager"; (cd .base && timeout 150 $B --out $OUT/before_eager.json 2>&1 | grep -E "tok/s")
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
echo "== GPU tests"; timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/gpu 2>&1 | tail -3
echo "== after, default AdamW: eager + compiled"; timeout 200 $B --compile --out $OUT/train_h100.json 2>&1 | grep -E "tok/s|x0|rror"
echo "== after, eager, MOEFLOW_FUSED_CE=0 (torch's cross-entropy on fp32 logits)"; MOEFLOW_FUSED_CE=0 timeout 150 $B --out $OUT/train_h100_torch_ce.json 2>&1 | grep -E "tok/s|rror"
echo "== after, optim.master_weights=true: eager + compiled"; timeout 200 $B --compile optim.master_weights=true --out $OUT/train_h100_master_weights.json 2>&1 | grep -E "tok/s|x0|rror"
ARGS="model=olmoe_1b_7b model.n_layers=4 gate.renormalize=false data=stdlib data.seq_len=2048 data.batch_size=8 model.max_seq_len=2048 trainer.steps=200 trainer.log_every=20 trainer.eval_every=0 trainer.ckpt_every=0 trainer.progress=false experts.impl=triton"
for mw in false true; do
  echo "== 200 steps, optim.master_weights=$mw"; timeout 120 moeflow train $ARGS optim.master_weights=$mw hydra.run.dir=/tmp/parity_$mw 2>&1 | grep -E "done|rror" | cut -c1-200
done
python3 - <<'PY'
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
def read(d, tag):
    a = EventAccumulator(d); a.Reload(); return {e.step: e.value for e in a.Scalars(tag)}
b, a = read("/tmp/parity_false/tensorboard", "train/loss"), read("/tmp/parity_true/tensorboard", "train/loss")
print("step  loss_default  loss_master  rel_diff")
for s in sorted(b):
    print(f"{s:4d}  {b[s]:.5f}  {a.get(s, float('nan')):.5f}  {abs(a.get(s, 0)-b[s])/b[s]:.2e}")
PY
