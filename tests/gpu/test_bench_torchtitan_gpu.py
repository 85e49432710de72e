"""`moeflow bench train --variants moe,torchtitan --compile` on a real GPU: torchtitan's own model of the
same shape trains in the bench's loop, eager and compiled by torchtitan's apply_compile, and the JSON
compares the MoE rows with it."""

import json
import math

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton", reason="needs Triton")
pytest.importorskip("torchtitan", reason="needs torchtitan (pip install moeflow[torchtitan])")

from helpers.bench import bench_train_args  # noqa: E402
from moeflow.launch.bench import train as bench_train  # noqa: E402


def test_torchtitan_rows_train_eager_and_compiled_beside_moeflow(tmp_path):
    out = tmp_path / "train.json"
    args = bench_train_args("moe,torchtitan", out, device="cuda", impls="triton", seq_len=64, batch_size=4, steps=3)
    args.compile = True
    bench_train.run(args)
    saved = json.loads(out.read_text())
    rows = {r["variant"]: r for r in saved["variants"]}
    assert set(rows) == {"moe-triton", "moe-triton-compiled", "torchtitan", "torchtitan-compiled"}, rows
    for name in ("torchtitan", "torchtitan-compiled"):
        r = rows[name]
        assert not r.get("skipped"), r
        assert r["tokens_per_s"] > 0 and math.isfinite(r["final_loss"]) and r["peak_mem_gib"] > 0
        assert r["torchtitan_params"] == r["params"]["total"]  # the same shape (no q/k norm in the tiny bench)
        assert r["forward_s"] > 0 and r["backward_s"] > 0 and r["optimizer_s"] > 0
    assert saved["moe_over_torchtitan"] == pytest.approx(
        rows["moe-triton"]["tokens_per_s"] / rows["torchtitan"]["tokens_per_s"]
    )
    compiled_ratio = rows["moe-triton-compiled"]["tokens_per_s"] / rows["torchtitan-compiled"]["tokens_per_s"]
    assert saved["moe_compiled_over_torchtitan_compiled"] == pytest.approx(compiled_ratio)
