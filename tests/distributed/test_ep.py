"""Expert parallelism equals the single-process model on the same global batch.

Two spawns (world 2 and world 4, gloo, float64) run every case once; the tests below
read their results. Covered: EP=2, EP=4, EP=2 x DP=2 for one MoE layer (outputs, input
and parameter gradients, global grad norm, parameters after an AdamW step) and for a few
LM training steps with gradient accumulation and active clipping; uneven loads with
ranks that receive zero rows, experts with zero tokens and dropped pairs; the chunked
overlap path; resume with a different EP size. Gates missing from the registry skip.
"""

from __future__ import annotations

import pytest

from helpers import ep_workers as W
from helpers.session_cache import once
from moeflow.moe.gates import GATES

pytestmark = pytest.mark.multiprocess

TOL = 1e-6  # float64 model; the gates compute router probabilities in float32 by design
GATE_NAMES = W.EQUIVALENCE_GATES


def _layer_cases(world: int) -> list[tuple]:
    eps = [2] if world == 2 else [4, 2]
    cases = [(f"{g}/ep{ep}", ep, g, 1, False, "grouped") for ep in eps for g in GATE_NAMES]
    cases += [(f"skewed/ep{ep}", ep, "skewed", 1, False, "grouped") for ep in eps]
    if world == 2:
        cases += [
            ("topk/ep2/overlap", 2, "topk", 3, True, "grouped"),
            ("skewed/ep2/overlap", 2, "skewed", 4, True, "grouped"),
        ]
        cases += [
            ("skewed/ep2/fused_permute", 2, "skewed", 1, False, "fused"),
            ("topk/ep2/expert_biases", 2, "topk", 1, False, "bias"),
        ]
    return cases


def _train_cases(world: int) -> list[tuple]:
    eps = [2] if world == 2 else [4, 2]
    cases = [(f"{g}/ep{ep}", ep, g, 1) for ep in eps for g in GATE_NAMES]
    if world == 2:
        cases += [("topk/ep2/overlap", 2, "topk", 2), ("topk/ep1/dp2", 1, "topk", 1)]
    return cases


@pytest.fixture(scope="module")
def world2(tmp_path_factory, worker_id):
    def compute(tmp):
        return {
            "layer": W.spawn("layer_cases", 2, _mk(tmp, "l"), _layer_cases(2)),
            "train": W.spawn("train_cases", 2, _mk(tmp, "t"), _train_cases(2)),
        }

    return once(tmp_path_factory, worker_id, "ep_world2", compute)


@pytest.fixture(scope="module")
def world4(tmp_path_factory, worker_id):
    def compute(tmp):
        return {
            "layer": W.spawn("layer_cases", 4, _mk(tmp, "l"), _layer_cases(4)),
            "train": W.spawn("train_cases", 4, _mk(tmp, "t"), _train_cases(4)),
            "resume": W.spawn("resume_case", 4, _mk(tmp, "r"), 2, 4),
        }

    return once(tmp_path_factory, worker_id, "ep_world4", compute)


def _mk(tmp, name):
    d = tmp / name
    d.mkdir()
    return d


def _check_layer(per_rank: list[dict], name: str) -> None:
    for rank, res in enumerate(per_rank):
        r = res[name]
        assert r["out"] < TOL, (rank, "output", r["out"])
        assert r["x_grad"] < TOL, (rank, "input grad", r["x_grad"])
        assert r["aux"] < TOL, (rank, "aux loss", r["aux"])
        assert r["grad_norm"] < TOL, (rank, "global grad norm", r["grad_norm"])
        bad = {k: v for k, v in r["grads"].items() if not v < TOL}
        assert not bad, (rank, "param grads differ", bad)
        bad = {k: v for k, v in r["params_after_step"].items() if not v < TOL}
        assert not bad, (rank, "params after AdamW differ", bad)


def _check_train(per_rank: list[dict], name: str) -> None:
    for rank, res in enumerate(per_rank):
        r = res[name]
        assert r["clipped"], "the test should exercise clipping"
        assert r["loss"] < TOL and r["grad_norm"] < TOL, (rank, r["loss"], r["grad_norm"])
        bad = {k: v for k, v in r["params"].items() if not v < TOL}
        assert not bad, (rank, "params after training differ", bad)


def _need(gate: str) -> None:
    if gate not in GATES:
        pytest.skip(f"gate {gate!r} is not registered yet")


@pytest.mark.parametrize("gate", GATE_NAMES)
def test_layer_ep2(world2, gate):
    _need(gate)
    _check_layer(world2["layer"], f"{gate}/ep2")


@pytest.mark.parametrize("gate", GATE_NAMES)
def test_layer_ep4(world4, gate):
    _need(gate)
    _check_layer(world4["layer"], f"{gate}/ep4")


@pytest.mark.parametrize("gate", GATE_NAMES)
def test_layer_ep2_dp2(world4, gate):
    _need(gate)
    _check_layer(world4["layer"], f"{gate}/ep2")


@pytest.mark.parametrize("world", [2, 4])
def test_uneven_loads_zero_rows_and_dropped_pairs(request, world):
    per_rank = request.getfixturevalue(f"world{world}")["layer"]
    ep = world
    name = f"skewed/ep{ep}"
    _check_layer(per_rank, name)
    counts = per_rank[0][name]["ref_tokens_per_expert"]
    assert all(c == 0 for c in counts[3:]) and all(c > 0 for c in counts[:3]), counts
    received = [res[name]["rows_received"] for res in per_rank]
    assert received[-1] == 0 and received[0] > 0, received  # the last EP rank holds only idle experts


def test_experts_that_fuse_the_permutation(world2):
    _check_layer(world2["layer"], "skewed/ep2/fused_permute")


def test_upcycled_experts_with_biases_are_sharded_too(world2):
    _check_layer(world2["layer"], "topk/ep2/expert_biases")


def test_pure_data_parallel_through_parallelize(world2):
    _check_train(world2["train"], "topk/ep1/dp2")


def test_overlap_chunks_and_shared_expert_in_flight(world2):
    _check_layer(world2["layer"], "topk/ep2/overlap")
    _check_layer(world2["layer"], "skewed/ep2/overlap")
    _check_train(world2["train"], "topk/ep2/overlap")


@pytest.mark.parametrize("gate", GATE_NAMES)
def test_training_steps_ep2(world2, gate):
    _need(gate)
    _check_train(world2["train"], f"{gate}/ep2")


@pytest.mark.parametrize("gate", GATE_NAMES)
def test_training_steps_ep4_and_ep2_dp2(world4, gate):
    _need(gate)
    _check_train(world4["train"], f"{gate}/ep4")
    _check_train(world4["train"], f"{gate}/ep2")


def test_resume_with_different_ep_size(world4):
    for rank, r in enumerate(world4["resume"]):
        assert r["saved_keys_match"], rank
        assert r["saved_vs_ref"] < TOL, (
            rank,
            "gathered checkpoint differs from the single-process state",
            r["saved_vs_ref"],
        )
        assert r["next_loss"] < TOL, (rank, "next-step loss after resharding", r["next_loss"])
        bad = {k: v for k, v in r["params_after"].items() if not v < TOL}
        assert not bad, (rank, "params after the resumed step differ", bad)


def test_parameter_count_is_the_whole_models_under_expert_parallelism(world2):
    """The run log's parameter count must not shrink to one rank's expert shard."""
    for rank, res in enumerate(world2["train"]):
        counted, full = res["topk/ep2"]["param_count"]
        assert counted == full, (rank, counted, full)
