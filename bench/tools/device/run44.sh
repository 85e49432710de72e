#!/bin/bash
# Issue 32 on an H200 (the short form of run43.sh, for the last ~8 minutes of a session): the 8-layer OLMoE-like
# shape, MoE vs dense compiled (train_h200.json); e128 at 8 layers over 200 steps, default against master
# weights + bf16 moments, same seed and data.
set -u -o pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null; export PYTHONPATH=/tmp/site
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader); echo "$GPU"
cd .head && python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; cut -c1-60 COMMIT
export TRITON_CACHE_DIR=/tmp/tc TORCHINDUCTOR_CACHE_DIR=/tmp/ic
case "$GPU" in *H200*) EL=8; J=train_h200.json;; *) EL=4; J=train_h100_8l_attempt.json;; esac
timeout 150 moeflow bench train --shape olmoe-like --variants moe,dense --impls triton --steps 10 trainer.compile=true optim.master_weights=true optim.moments_dtype=bfloat16 --out $OUT/$J 2>&1 | grep -E "tok/s|x0|rror|first step" | cut -c1-250
echo "== at ${SECONDS}s"
COMMON="data=stdlib data.seq_len=2048 data.batch_size=4 model.max_seq_len=2048 trainer.steps=200 trainer.log_every=10 trainer.eval_every=0 trainer.ckpt_every=0 trainer.progress=false experts.impl=triton"
E128="model=qwen3_30b_a3b model.n_layers=$EL"
for run in "e128_default|$E128" "e128_fast|$E128 optim.master_weights=true optim.moments_dtype=bfloat16"; do
  name=${run%%|*}; args=${run#*|}
  echo "== $name ($EL layers) at ${SECONDS}s"; timeout 100 moeflow train $args $COMMON hydra.run.dir=/tmp/p_$name 2>&1 | grep -E "model:|done|rror|memory" | cut -c1-250
  cp /tmp/p_$name/train.log $OUT/parity_$name.log 2>/dev/null
done
python3 - <<'PY'
import statistics
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
def read(name, tag="train/loss"):
    try:
        a = EventAccumulator(f"/tmp/p_{name}/tensorboard"); a.Reload(); return {e.step: e.value for e in a.Scalars(tag)}
    except Exception:
        return {}
d, f = read("e128_default"), read("e128_fast")
print("step  default  master+bf16m")
for s in sorted(d):
    print(f"{s:4d}  {d[s]:.4f}  {f.get(s, float('nan')):.4f}")
last = [s for s in sorted(d) if s > 100 and s in f]
if last: print("mean steps 110-200: default %.4f  master+bf16m %.4f" % tuple(statistics.mean(x[s] for s in last) for x in (d, f)))
PY
echo "== end at ${SECONDS}s"
