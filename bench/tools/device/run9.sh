#!/bin/bash
# Issue 32 follow-up on one H100 from a clean export of HEAD (.head): the GPU tests that stopped run8
# (full output), loss parity with a control for how far a tiny numerical change drifts in 200 MoE steps,
# and the master-weights bench.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
export TRITON_CACHE_DIR=/tmp/tc
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== GPU tests: the new kernels"; timeout 100 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_kernels_gpu.py -k "master_weight or cross_entropy" 2>&1 | tail -3
echo "== GPU test: capacity host syncs"; timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/gpu/test_dispatch_gpu.py -k "host_syncs" 2>&1 | grep -vE "^\s*$" | tail -40
ARGS="model=olmoe_1b_7b model.n_layers=4 gate.renormalize=false data=stdlib data.seq_len=2048 data.batch_size=8 model.max_seq_len=2048 trainer.steps=200 trainer.log_every=10 trainer.eval_every=0 trainer.ckpt_every=0 trainer.progress=false experts.impl=triton"
echo "== 200 steps: default"; timeout 100 moeflow train $ARGS hydra.run.dir=/tmp/p_default 2>&1 | grep -E "done|rror" | cut -c1-160
echo "== 200 steps: default, torch cross-entropy (control: a tiny numerical change)"; MOEFLOW_FUSED_CE=0 timeout 100 moeflow train $ARGS hydra.run.dir=/tmp/p_control 2>&1 | grep -E "done|rror" | cut -c1-160
echo "== 200 steps: master weights"; timeout 100 moeflow train $ARGS optim.master_weights=true hydra.run.dir=/tmp/p_master 2>&1 | grep -E "done|rror" | cut -c1-160
python3 - <<'PY'
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
def read(d, tag):
    a = EventAccumulator(d); a.Reload(); return {e.step: e.value for e in a.Scalars(tag)}
d, c, m = (read(f"/tmp/p_{n}/tensorboard", "train/loss") for n in ("default", "control", "master"))
gd, gm = read("/tmp/p_default/tensorboard", "train/grad_norm"), read("/tmp/p_master/tensorboard", "train/grad_norm")
print("step  default  control(ce)  master   |ctl-def|/def  |mst-def|/def  gnorm_def  gnorm_mst")
for s in sorted(d):
    print(f"{s:4d}  {d[s]:.4f}  {c.get(s, float('nan')):.4f}  {m.get(s, float('nan')):.4f}  {abs(c.get(s,0)-d[s])/d[s]:.2e}  {abs(m.get(s,0)-d[s])/d[s]:.2e}  {gd[s]:.3f}  {gm.get(s, float('nan')):.3f}")
import statistics
last = [s for s in sorted(d) if s > 100]
print("mean loss steps 110-200: default %.4f control %.4f master %.4f" % tuple(statistics.mean(x[s] for s in last) for x in (d, c, m)))
PY
echo "== bench: master weights, eager + compiled"; timeout 200 moeflow bench train --shape olmoe-like --variants moe --impls triton --steps 10 --compile model.n_layers=4 optim.master_weights=true --out $OUT/train_h100_master_weights.json 2>&1 | grep -E "tok/s|x0|rror"
