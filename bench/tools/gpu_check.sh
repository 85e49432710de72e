#!/usr/bin/env bash
# One device-tool call: install, GPU correctness tests, then the expert benchmark (and optionally
# the 200-step triton-vs-torch training comparison). Run from the repository root:
#   bash bench/tools/gpu_check.sh [test] [bench] [train] [seeds] [diag] [ep] [dispatch] [largest]   (default: test bench)
# dispatch: `moeflow bench ep` with each transport on this node's GPUs; largest: bench/tools/largest_model.py.
# diag: one step's gradients of triton-bf16 and torch-bf16 against torch-fp32, and an fp32 training run.
# Wheels for packages the GPU image lacks (hydra-core, omegaconf, antlr4) are taken from $WHEELS.
set -uo pipefail
OUT=${OUT:-/tmp/moeflow_out}; mkdir -p "$OUT"
WHEELS=${WHEELS:-.whl}
export PYTHONUNBUFFERED=1
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || { echo "install failed"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
stages=${*:-test bench}
for stage in $stages; do
  case $stage in
    test)
      timeout ${TEST_TIMEOUT:-300} python3 -m pytest ${TEST_FILES:-tests/unit/test_kernels.py tests/gpu/ tests/unit/test_topk_kernel.py} ${PYTEST_FLAGS:--x} -q -p no:cacheprovider --timeout 150 --durations=12 2>&1 | tee "$OUT/tests.log" | tail -15 ;;
    bench)
      timeout ${BENCH_TIMEOUT:-400} moeflow bench experts --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" ;;
    train)
      for impl in triton torch; do
        timeout ${TRAIN_TIMEOUT:-150} moeflow train model=small data.seq_len=512 data.batch_size=32 trainer.steps=200 trainer.log_every=10 \
          trainer.eval_every=100 trainer.ckpt_every=1000 trainer.progress=false experts.impl=$impl \
          hydra.run.dir=/tmp/run_$impl > "$OUT/train_$impl.log" 2>&1 || { echo "train $impl failed:"; tail -20 "$OUT/train_$impl.log"; }
        tail -3 "$OUT/train_$impl.log"
      done
      python3 bench/tools/compare_runs.py /tmp/run_triton/tensorboard /tmp/run_torch/tensorboard | tee "$OUT/compare.txt" ;;
    seeds)  # the 200-step comparison over several seeds (SEEDS, default 1 2 3)
      for seed in ${SEEDS:-1 2 3}; do
        for impl in triton torch; do
          timeout ${TRAIN_TIMEOUT:-150} moeflow train model=small data.seq_len=512 data.batch_size=32 trainer.steps=200 trainer.log_every=10 \
            trainer.eval_every=100 trainer.ckpt_every=1000 trainer.progress=false trainer.seed=$seed experts.impl=$impl \
            hydra.run.dir=/tmp/seeds/${impl}_s$seed > "$OUT/train_${impl}_s$seed.log" 2>&1 || { echo "train $impl seed $seed failed:"; tail -5 "$OUT/train_${impl}_s$seed.log"; }
        done
      done
      python3 bench/tools/compare_seeds.py /tmp/seeds | tee "$OUT/seeds.txt" ;;
    ep)  # every GPU of the node: `moeflow bench ep [EP_ARGS]` at each of EP_CHUNKS overlap chunks (NVLink multicast left off)
      gpus=$(nvidia-smi -L | wc -l)
      for chunks in ${EP_CHUNKS:-1 2 4}; do
        NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 timeout ${EP_TIMEOUT:-150} \
          torchrun --standalone --nproc-per-node "$gpus" -m moeflow.launch.cli bench ep --overlap-chunks "$chunks" \
          --json "$OUT/ep_$chunks.json" ${EP_ARGS:-} > "$OUT/ep_$chunks.log" 2>&1 || { echo "bench ep failed:"; grep -m1 -A3 Error "$OUT/ep_$chunks.log"; }
        grep -A5 "^moeflow bench ep" "$OUT/ep_$chunks.log"
      done ;;
    dispatch)  # each transport (DISPATCHERS) at the shapes DISPATCH_SHAPES ("E:k" pairs), every GPU of the node
      gpus=$(nvidia-smi -L | wc -l)
      for shape in ${DISPATCH_SHAPES:-16:4 64:8}; do
        for d in ${DISPATCHERS:-alltoall capacity symm_mem}; do
          tag=${d}_E${shape%%:*}
          NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 timeout ${EP_TIMEOUT:-150} \
            torchrun --standalone --nproc-per-node "$gpus" -m moeflow.launch.cli bench ep --dispatcher "$d" \
            --experts "${shape%%:*}" --top-k "${shape##*:}" --json "$OUT/ep_$tag.json" ${EP_ARGS:-} > "$OUT/ep_$tag.log" 2>&1 \
            || { echo "bench ep $tag failed:"; grep -m2 -B2 -A3 "Error" "$OUT/ep_$tag.log" | tail -6; }
          grep -A7 "^moeflow bench ep" "$OUT/ep_$tag.log"
        done
      done ;;
    largest)
      timeout ${LARGEST_TIMEOUT:-420} python3 bench/tools/largest_model.py --layers ${LARGEST_LAYERS:-16 20} --ac ${LARGEST_AC:-full} -- ${LARGEST_ARGS:-} 2>&1 | tee "$OUT/largest.log" | grep -v '^\[' ;;
    diag)
      python3 bench/tools/compare_grads.py configs/model/small.yaml 8 512 2>&1 | tee "$OUT/grads.txt"
      timeout ${TRAIN_TIMEOUT:-150} moeflow train model=small data.seq_len=512 data.batch_size=32 trainer.steps=${FP32_STEPS:-100} trainer.log_every=10 \
          trainer.eval_every=100 trainer.ckpt_every=1000 trainer.progress=false experts.impl=torch trainer.precision=fp32 \
          hydra.run.dir=/tmp/run_fp32 > "$OUT/train_fp32.log" 2>&1 && python3 bench/tools/compare_runs.py /tmp/run_fp32/tensorboard /tmp/run_fp32/tensorboard | tee "$OUT/fp32.txt" | head -14 ;;
  esac
done
