"""The distributed core on gloo: FSDP2 + expert parallelism on one mesh equals one process.

For each mesh, every gate family: a model built on the meta device, parallelised, materialised
and initialised equals the single-process model built with the same seed; on the same global
batch its losses, every gradient, the clipping norm and the weights after AdamW steps equal the
single-process run's (float32 tolerance). Also: bytes per rank fall as 1/N with dp_shard = N,
activation checkpointing changes nothing, and impossible meshes fail in one line.
"""

from __future__ import annotations

import pytest

from helpers import ep_workers as W
from helpers.fsdp_workers import GATES
from moeflow.moe.errors import ConfigError
from moeflow.parallel.mesh import ParallelDims

pytestmark = pytest.mark.multiprocess

MESHES = [
    (2, {"dp_shard": 2, "ep": 2}),  # experts: efsdp 1 x ep 2 (no FSDP over experts)
    (4, {"dp_shard": 4}),  # FSDP over 4, experts FSDP over 4
    (4, {"dp_shard": 4, "ep": 2}),  # experts: efsdp 2 x ep 2 (FSDP on the model dim, EP on the expert dim)
    (4, {"dp_replicate": 2, "dp_shard": 2, "ep": 2}),  # HSDP, experts replicated over the replicas
]


def assert_equal_to_single_process(results: dict) -> None:
    for gate, r in results.items():
        assert r["init"] == 0.0, (gate, r)  # meta init == single-process init, exactly
        assert r["loss"] < 1e-5 and r["norm"] < 1e-4, (gate, r)
        assert r["grad"] < 1e-4 and r["weights"] < 1e-4, (gate, r)


@pytest.mark.parametrize(
    "world, dims", MESHES, ids=lambda v: "-".join(f"{k}{x}" for k, x in v.items()) if isinstance(v, dict) else f"w{v}"
)
def test_every_gate_trains_like_one_process(tmp_path, world, dims):
    results = W.spawn("helpers.fsdp_workers:equivalence_all", world, tmp_path, dims, sorted(GATES), 2, "none")
    for rank_result in results:
        assert_equal_to_single_process(rank_result)


CP_MESHES = [
    (2, {"cp": 2}),  # every rank holds half of every sequence (chunks r and 3-r of 4)
    (4, {"cp": 4}),
    (4, {"cp": 2, "ep": 2}),  # experts borrow from dp_shard x cp = 4 ranks: efsdp 2 x ep 2
    (4, {"dp_shard": 2, "cp": 2}),  # two batches, each split over a CP group of two
]


@pytest.mark.parametrize(
    "world, dims",
    CP_MESHES,
    ids=lambda v: "-".join(f"{k}{x}" for k, x in v.items()) if isinstance(v, dict) else f"w{v}",
)
def test_context_parallel_trains_like_one_process(tmp_path, world, dims):
    """parallel.cp: sequence shards with exact attention across them, rotary at the true positions, GQA and q/k
    norms on, the topk gate with DeepSeek-V3's sequence-level balance loss (its per-sequence sums joined
    over the CP group) and the sinkhorn gate: losses, gradients, norm and weights equal
    the single-process run on the same global batch."""
    results = W.spawn(
        "helpers.fsdp_workers:equivalence_over",
        world,
        tmp_path,
        dims,
        ["topk_seq_aux", "sinkhorn"],
        {"n_kv_heads": 1, "qk_norm": True},
    )
    for rank_result in results:
        assert_equal_to_single_process(rank_result)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_changes_nothing(tmp_path, mode):
    """Under FSDP2 + EP (both expert layouts: 2 ranks have no expert FSDP, 4 have), with the DeepSeek
    gate whose bias update is a side effect the recomputation must not repeat."""
    for world, dims in ((2, {"dp_shard": 2, "ep": 2}), (4, {"dp_replicate": 2, "dp_shard": 2, "ep": 2})):
        results = W.spawn(
            "helpers.fsdp_workers:equivalence_all",
            world,
            tmp_path / f"w{world}",
            dims,
            ["deepseek_v3", "topk"],
            2,
            mode,
        )
        assert_equal_to_single_process(results[0])


def test_per_rank_state_falls_as_one_over_dp_shard(tmp_path):
    """Parameters + gradients + AdamW moments held per rank, from the live local tensors."""
    preset = dict(
        vocab_size=256,
        d_model=64,
        n_layers=2,
        n_heads=4,
        d_ff=64,
        num_experts=8,
        top_k=2,
        max_seq_len=16,
        gate={"name": "topk"},
    )
    per_rank = {}
    for n in (1, 2, 4):
        results = W.spawn("helpers.fsdp_workers:state_bytes", n, tmp_path / f"n{n}", {"dp_shard": n}, preset)
        per_rank[n] = max(r["params"] + r["grads"] + r["optimizer"] for r in results)
        total = results[0]["total_params"] * 4 * 4  # fp32 params, grads and two moments
        assert sum(r["params"] + r["grads"] + r["optimizer"] for r in results) == pytest.approx(
            total, rel=0.02
        )  # nothing replicated
    assert per_rank[2] == pytest.approx(per_rank[1] / 2, rel=0.05) and per_rank[4] == pytest.approx(
        per_rank[1] / 4, rel=0.05
    ), per_rank


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(world=4, dp_shard=3), ["dp_shard=3", "= 3 ranks", "world has 4"]),
        (dict(world=4, dp_replicate=3), ["dp_replicate=3", "does not divide the world size 4"]),
        (dict(world=4, ep=3), ["parallel.ep=3 does not divide dp_shard x tp = 4"]),
        (dict(world=1, ep=2), ["torchrun --nproc-per-node 2"]),
        (dict(world=6, cp=4), ["parallel.cp=4", "does not divide the world size 6"]),
        (dict(world=1, pp=2), ["parallel.pp=2", "world size 1; launch 2 processes", "launcher.nproc=2"]),
        (dict(world=2, dp_shard=0), ["dp_shard must be a positive integer or -1"]),
    ],
)
def test_impossible_meshes_are_one_line_errors(kwargs, words):
    with pytest.raises(ConfigError) as e:
        ParallelDims(**kwargs)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_the_model_must_split_over_the_mesh():
    with pytest.raises(ConfigError, match="parallel.ep=4 does not divide model.num_experts=6"):
        ParallelDims(world=4, ep=4).check_model(num_experts=6, n_heads=4, n_kv_heads=4)
    dims = ParallelDims(world=8, dp_shard=8, ep=4)
    assert (dims.dp_shard, dims.efsdp, dims.ep, dims.dp) == (8, 2, 4, 8)


def test_selective_checkpointing_does_not_resend_the_expert_exchanges(tmp_path):
    """The backward of 2 EP blocks runs each block's exchanges' backward (4); full checkpointing also
    re-runs the forward exchanges (8); selective keeps their outputs and must not (it ran 8, as full)."""
    results = W.spawn("helpers.fsdp_workers:backward_exchanges", 2, tmp_path, ["none", "selective", "full"])
    for counts in results:
        assert counts["selective"] == counts["none"] and counts["full"] > counts["none"], counts
