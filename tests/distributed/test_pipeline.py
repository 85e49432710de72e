"""Pipeline parallelism on gloo: pp x FSDP2 x EP equals one process on the same global batch.

Each case builds the pipelined model (meta init, this rank's stages, each stage FSDP2 + EP sharded,
torch.distributed.pipelining's schedule) beside a single-process reference with the same seed that
runs the same micro-batches one after another. Losses, aux losses (every stage's reaching the
gradient), every gradient by name, the clip norm and the weights after two AdamW steps must agree
(float32; the weights after AdamW to 1e-4: its first steps move each weight by about lr whatever the gradient size, so float32 differences of tiny gradients show). The zero-bubble schedules are refused (see `test_pp_launch.py`): on these stages they
left weight gradients unset.
"""

from __future__ import annotations

import pytest

from helpers import ep_workers as W

pytestmark = pytest.mark.multiprocess

GATE_CASES = [  # (gate, schedule[, blocks per stage]); topk: aux loss on; deepseek_v3: bias updates
    ("topk", "1f1b", [1, 3]),
    ("sinkhorn", "gpipe"),
    ("expert_choice", "interleaved_1f1b"),
    ("dts", "1f1b"),
    ("deepseek_v3", "interleaved_1f1b"),
    ("topk_seq_aux", "1f1b"),
]

MESHES = [
    (2, {"pp": 2}, GATE_CASES),
    (4, {"pp": 4}, [("topk", "1f1b"), ("sinkhorn", "gpipe")]),  # one block per stage
    (4, {"pp": 2, "ep": 2}, [("topk", "1f1b"), ("expert_choice", "interleaved_1f1b"), ("dts", "1f1b")]),
    (4, {"pp": 2, "dp_shard": 2}, [("topk", "interleaved_1f1b")]),
]  # HSDP replicas inside each stage: test_stages_without_moe_blocks_train_like_one_process
# HSDP with experts summed over the replicas by hand (efsdp 1), where a rank's first stage has no MoE block:
# every other block is MoE (1, 3, 5, 7); rank 0 runs stages 0 (block 0) and 2 (block 3)
SPARSE_MOE = [("topk", "interleaved_1f1b", [1, 2, 1, 4]), ("sinkhorn", "1f1b", [3, 5])]
CP_CASES = [("topk_seq_aux", "1f1b"), ("sinkhorn", "interleaved_1f1b")]


@pytest.mark.parametrize(
    "world, dims, cases", MESHES, ids=lambda v: "-".join(f"{k}{x}" for k, x in v.items()) if isinstance(v, dict) else ""
)
def test_pipeline_trains_like_one_process(tmp_path, world, dims, cases):
    """On 4 ranks pp=2 x ep=2 is pp=2 x dp_shard=2 x ep=2: experts borrow the stage's data-parallel ranks."""
    results = W.spawn("helpers.pp_workers:equivalence_all", world, tmp_path, dims, cases)
    for rank_result in results:
        for case, r in rank_result.items():
            assert r["init"] == 0.0, (case, r)  # every stage's meta init equals the single-process model's
            assert r["loss"] < 1e-5 and r["aux"] < 1e-6, (case, r)
            assert r["grad"] < 1e-5 and r["norm"] < 1e-5 and r["weights"] < 1e-4, (case, r)
    splits = {case: r["split"] for case, r in results[0].items()}
    assert splits.get("topk/1f1b/[1, 3]", [[0], [1, 2, 3]]) == [[0], [1, 2, 3]], splits


def test_stages_without_moe_blocks_train_like_one_process(tmp_path):
    results = W.spawn(
        "helpers.pp_workers:equivalence_all",
        4,
        tmp_path,
        {"pp": 2, "dp_replicate": 2, "dp_shard": 1},
        SPARSE_MOE,
        {"n_layers": 8, "moe_every": 2},
    )
    for rank_result in results:
        for case, r in rank_result.items():
            assert r["init"] == 0.0 and r["loss"] < 1e-5 and r["aux"] < 1e-6, (case, r)
            assert r["grad"] < 1e-5 and r["norm"] < 1e-5 and r["weights"] < 1e-4, (case, r)
    assert results[0]["topk/interleaved_1f1b/[1, 2, 1, 4]"]["split"] == [[0], [1, 2], [3], [4, 5, 6, 7]]


def test_pipeline_of_sequence_shards_trains_like_one_process(tmp_path):
    """pp=2 x cp=2: each stage's attention exact over its CP group's shards (GQA, q/k norms on), DeepSeek-V3's
    sequence-level balance loss joined over the CP group, on every stage."""
    results = W.spawn(
        "helpers.pp_workers:equivalence_all",
        4,
        tmp_path,
        {"pp": 2, "cp": 2},
        CP_CASES,
        {"n_kv_heads": 1, "qk_norm": True},
    )
    for rank_result in results:
        for case, r in rank_result.items():
            assert r["init"] == 0.0 and r["loss"] < 1e-5 and r["aux"] < 1e-6, (case, r)
            assert r["grad"] < 1e-5 and r["norm"] < 1e-5 and r["weights"] < 1e-4, (case, r)
