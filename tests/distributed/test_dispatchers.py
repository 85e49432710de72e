"""Every dispatcher transport equals the single-process layer (gloo, float64, 2 and 4 processes).

alltoall (dropless) and capacity with room for everything must give the single-process
layer's outputs and gradients exactly (float64); capacity with a small factor must equal a
reference that drops the same pairs. Every gate family, plus a skewed gate that leaves whole
ranks and experts without tokens. Options are checked before any work (one-line errors).
"""

from __future__ import annotations

import pytest

from helpers import dispatch_workers as W  # noqa: F401  (spawned by name)
from helpers.ep_workers import spawn
from helpers.session_cache import once
from moeflow.moe.errors import ConfigError
from moeflow.moe.gates import GATES
from moeflow.parallel.dispatchers import DispatchOptions, check_options, symm_mem_unavailable

TOL = 1e-6  # float64 model; router probabilities are float32 by design
GATE_FAMILIES = sorted(GATES) + ["skewed"]
ROOMY, TIGHT = 8.0, 0.4  # capacity factors: nothing dropped / many pairs dropped


def _cases(world: int) -> list[tuple]:
    ep = world
    cases = [(f"{g}/alltoall/ep{ep}", ep, g, "alltoall", ROOMY) for g in GATE_FAMILIES]
    cases += [(f"{g}/capacity-roomy/ep{ep}", ep, g, "capacity", ROOMY) for g in GATE_FAMILIES]
    cases += [(f"{g}/capacity-tight/ep{ep}", ep, g, "capacity", TIGHT) for g in GATE_FAMILIES]
    if world == 4:
        cases += [
            ("topk/capacity-tight/ep2dp2", 2, "topk", "capacity", TIGHT),
            ("skewed/alltoall/ep2dp2", 2, "skewed", "alltoall", ROOMY),
        ]
    if world == 2:
        cases += [
            ("topk/capacity/ep1dp2", 1, "topk", "capacity", TIGHT),
            ("topk/alltoall/ep1dp2", 1, "topk", "alltoall", ROOMY),
        ]
    return cases


@pytest.fixture(scope="module")
def results(tmp_path_factory, worker_id):
    def compute(tmp):
        return {
            world: spawn("helpers.dispatch_workers:dispatch_cases", world, tmp / f"world{world}", _cases(world))
            for world in (2, 4)
        }

    return once(tmp_path_factory, worker_id, "dispatchers", compute)


def _check(per_rank: list[dict], name: str) -> dict:
    for rank, res in enumerate(per_rank):
        r = res[name]
        assert r["out"] < TOL, f"{name} rank {rank}: output differs by {r['out']}"
        assert r["x_grad"] < TOL, f"{name} rank {rank}: input gradient differs by {r['x_grad']}"
        worst = max(r["grads"].items(), key=lambda kv: kv[1])
        assert worst[1] < TOL, f"{name} rank {rank}: gradient of {worst[0]} differs by {worst[1]}"
        assert r["aux"] < TOL, f"{name} rank {rank}: aux loss differs by {r['aux']}"
    return per_rank[0][name]


pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("gate", GATE_FAMILIES)
def test_alltoall_equals_one_process(results, world, gate):
    r = _check(results[world], f"{gate}/alltoall/ep{world}")
    assert r["dispatcher"] == "AllToAllDispatcher"
    assert r["host_syncs"] == 1, "alltoall reads the split sizes once per forward and never in the backward"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("gate", GATE_FAMILIES)
def test_capacity_with_room_equals_one_process_and_drops_nothing(results, world, gate):
    name = f"{gate}/capacity-roomy/ep{world}"
    _check(results[world], name)
    for res in results[world]:
        assert res[name]["dropped"] == 0.0 and res[name]["host_syncs"] == 0


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("gate", GATE_FAMILIES)
def test_capacity_drops_exactly_the_overflow(results, world, gate):
    name = f"{gate}/capacity-tight/ep{world}"
    _check(results[world], name)
    dropped = [res[name]["dropped"] for res in results[world]]
    ref_dropped = 1 - results[world][0][name]["ref_kept"]
    assert ref_dropped > 0, "the tight factor must drop pairs, or this case tests nothing"
    assert max(dropped) > 0
    if gate == "topk":  # every rank routes tokens x top_k pairs: the mean of the ranks' fractions is the global one
        assert abs(sum(dropped) / len(dropped) - ref_dropped) < 1e-6  # a float32 device scalar


def test_zero_token_ranks_and_mixed_layouts(results):
    # the skewed gate sends nothing to the ranks holding experts 3..7 (checked by the cases above);
    # here: EP groups smaller than the world, and an EP group of one running the same code path
    for world, name in [
        (4, "topk/capacity-tight/ep2dp2"),
        (4, "skewed/alltoall/ep2dp2"),
        (2, "topk/capacity/ep1dp2"),
        (2, "topk/alltoall/ep1dp2"),
    ]:
        r = _check(results[world], name)
        assert r["dispatcher"] in ("CapacityDispatcher", "AllToAllDispatcher")
    received = [res["skewed/alltoall/ep4"]["rows_received"] for res in results[4]]
    assert 0 in received and max(received) > 0, f"the skewed case must leave a rank without rows, got {received}"


def test_unavailable_transport_names_the_available_ones():
    with pytest.raises(
        ConfigError,
        match="parallel.dispatcher=symm_mem is unavailable: it needs CUDA.*available here: alltoall, capacity",
    ):
        check_options(DispatchOptions(name="symm_mem"), "cpu")
    assert symm_mem_unavailable("cpu")
    with pytest.raises(ConfigError, match="unknown; choose one of: auto, local, alltoall, capacity, symm_mem"):
        check_options(DispatchOptions(name="nccl"), "cpu")
    with pytest.raises(ConfigError, match="capacity_factor must be > 0"):
        check_options(DispatchOptions(name="capacity", capacity_factor=0.0), "cpu")
    with pytest.raises(ConfigError, match="overlap_chunks=2 is an alltoall option"):
        check_options(DispatchOptions(name="capacity", overlap_chunks=2), "cpu")
