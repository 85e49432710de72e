"""moeflow inside megatron-core, and checkpoints both ways.

CPU (here and in CI): megatron-core's parallel_state on gloo, model construction, the
moeflow MoE submodule inside megatron (vs moeflow's own layer), megatron's SequentialMLP
experts (vs moeflow's experts, same weights through the converter), and checkpoint
conversion round trips against a real megatron-core GPTModel's state_dict.
GPU (`gpu` marker, run through the device tool): megatron-core's attention and GPTModel
forward need CUDA, so the block/model equivalence and `moeflow train engine=megatron` run there.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

megatron_core = pytest.importorskip("megatron.core", reason="pip install moeflow[megatron]")

from helpers.session_cache import once  # noqa: E402
from helpers.timeouts import limit  # noqa: E402
from moeflow.moe.errors import ConfigError  # noqa: E402
from moeflow.moe.model import ModelConfig, Transformer, build_moe_layer  # noqa: E402
from moeflow.parallel.integrations import megatron_ckpt as mck  # noqa: E402

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (megatron-core attention/GPTModel)")


@pytest.fixture(scope="module")
def parallel_state():
    from megatron.core import parallel_state as ps

    own = not dist.is_initialized()
    if own:
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(0)
    yield ps
    ps.destroy_model_parallel()
    if own:
        dist.destroy_process_group()


def tiny(**kw) -> ModelConfig:
    base = dict(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, d_ff=24, num_experts=4, top_k=2, moe_every=1
    )
    return ModelConfig(**{**base, **kw})


def random_state(mc: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = Transformer(mc)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # norms and gates too: a layout mistake cannot hide behind ones/zeros
    from moeflow.moe.state import unique_state_dict

    return unique_state_dict(model)


CASES = {
    "swiglu": tiny(),
    "gelu_tied": tiny(activation="gelu", tie_embeddings=True),
    "interleaved_shared": tiny(n_layers=4, moe_every=2, shared_experts=1, dense_d_ff=40),
    "gqa": tiny(n_heads=4, n_kv_heads=2, head_dim=16),
}


@pytest.mark.parametrize("layout", mck.LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_checkpoint_round_trip(case, layout):
    mc = CASES[case]
    state = random_state(mc)
    meg = mck.to_megatron(state, mc, layout=layout)
    assert mck.detect_layout(meg) == layout
    back = mck.from_megatron(meg, mc)
    assert sorted(back) == sorted(state)
    for k in state:
        assert torch.equal(back[k], state[k]), k
    inferred = mck.infer_model_config(meg, n_heads=mc.n_heads, top_k=mc.top_k)
    for f in (
        "vocab_size",
        "d_model",
        "n_layers",
        "d_ff",
        "num_experts",
        "moe_every",
        "activation",
        "tie_embeddings",
        "shared_experts",
        "kv_heads",
        "head_size",
    ):
        assert getattr(inferred, f) == getattr(mc, f), f


@pytest.mark.parametrize("case", CASES)
def test_export_loads_into_megatron_gpt_model(parallel_state, case):
    """Key names and shapes are megatron-core's own: a native MoE GPTModel (SequentialMLP) loads them."""
    from moeflow.parallel.integrations.megatron_core import build_native_gpt_model

    mc = CASES[case]
    state = random_state(mc, seed=1)
    model = build_native_gpt_model(mc, "cpu", layout="sequential", dispatcher="allgather")
    theirs = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    ours = mck.to_megatron(state, mc, layout="sequential")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    back = mck.from_megatron(model.state_dict(), mc)
    for k in state:
        assert torch.equal(back[k], state[k]), k


def test_megatron_sequential_experts_compute_like_moeflow(parallel_state):
    """megatron-core's SequentialMLP with converted weights == moeflow's GroupedExperts (float64 reference)."""
    from moeflow.parallel.integrations.megatron_core import build_native_gpt_model

    mc = tiny()
    state = random_state(mc, seed=2)
    model = build_native_gpt_model(mc, "cpu", layout="sequential", dispatcher="allgather")
    model.load_state_dict(mck.to_megatron(state, mc, layout="sequential"), strict=False)
    theirs = model.decoder.layers[0].mlp.experts
    ours = build_moe_layer(mc).experts
    ours.load_state_dict(
        {k.split("ffn.experts.")[1]: v for k, v in state.items() if k.startswith("blocks.0.ffn.experts.")}
    )
    counts_E = torch.tensor([5, 0, 3, 8])
    x_AD = torch.randn(int(counts_E.sum()), mc.d_model)
    y_theirs, _ = theirs(x_AD, counts_E, torch.ones(x_AD.shape[0]))
    y_ours = ours(x_AD, counts_E)
    ref = ours.double()(x_AD.double(), counts_E)
    torch.testing.assert_close(y_ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_theirs.double(), ref, rtol=1e-5, atol=1e-6)


def test_moeflow_moe_inside_megatron_model(parallel_state):
    """GPTModel built through the moeflow spec: MoE slot == moeflow MoELayer (output, grads, aux loss)."""
    from moeflow.moe.layer import moe_layers
    from moeflow.parallel.integrations.megatron_core import MegatronGroups, build_gpt_model

    mc = tiny(n_layers=4, moe_every=2, gate={"name": "topk", "aux_loss_coef": 0.1})
    state = random_state(mc, seed=3)
    model = build_gpt_model(mc, "cpu")
    missing, unexpected = model.load_state_dict(mck.to_megatron(state, mc, native=False), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    back = mck.from_megatron(model.state_dict(), mc)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert len(moe_layers(model)) == 2 and isinstance(model.decoder.layers[1].mlp.groups, MegatronGroups)
    assert all(p.allreduce for p in model.decoder.layers[1].mlp.moe.experts.parameters())  # EP=1: reduced like dense

    slot = model.decoder.layers[1].mlp  # MoeflowMoE
    ref = build_moe_layer(mc)
    ref.load_state_dict({k.split("blocks.1.ffn.")[1]: v for k, v in state.items() if k.startswith("blocks.1.ffn.")})
    x_SBD = torch.randn(6, 3, mc.d_model)
    x1, x2 = x_SBD.clone().requires_grad_(), x_SBD.clone().requires_grad_()
    y, bias = slot(x1)
    assert bias is None
    y.square().sum().backward()  # the aux loss reaches the gate through megatron's MoEAuxLossAutoScaler
    y_ref = ref(x2.reshape(-1, mc.d_model)).reshape(x_SBD.shape)
    (y_ref.square().sum() + ref.aux_loss).backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x1.grad, x2.grad)
    for (n, p), (_, q) in zip(slot.moe.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


# ---- expert parallelism through parallel_state (gloo, 2 and 4 processes) ---------------------

EP_GATES = {
    "topk": {"name": "topk", "aux_loss_coef": 0.1},
    # capacity dropping: the capacity and which pairs drop depend on the global token count
    "capacity": {
        "name": "topk",
        "aux_loss_coef": 0.1,
        "dropless": False,
        "capacity_factor": 1.0,
        "drop_policy": "position",
    },
}
EP_SYNCS = ("megatron",)  # gradient sync: megatron-core's DDP (engine=megatron's)
EP_TOL = 1e-6  # float64 layer; the gate's router probabilities are float32 by design


def _slot_spawn(tmp_path_factory, world: int, ep: int, tp: int = 1) -> list[dict]:
    from helpers import ep_workers as W

    cases = [(f"{g}/{s}", ep, EP_GATES[g], s, tp) for g in EP_GATES for s in EP_SYNCS]
    return W.spawn(
        "helpers.megatron_workers:slot_cases", world, tmp_path_factory.mktemp(f"mcore_tp{tp}_ep{ep}_w{world}"), cases
    )


def _assert_slot_equals_one_process(rank: int, r: dict, gate: str, sync: str) -> None:
    """Outputs, input/router/expert-shard grads, aux loss, clip norm, gathered checkpoint vs one process."""
    assert r["out"] < EP_TOL and r["x_grad"] < EP_TOL and r["aux"] < EP_TOL, (rank, r)
    bad = {k: v for k, v in r["grads"].items() if not v < EP_TOL}
    assert not bad, (rank, "grads differ", bad)
    assert r["norm"] < EP_TOL, "the plan's clip norm: expert/F shards summed over EP/TP, the gate once"
    assert r["gathered"] == 0.0, "the plan's full_state must gather the shards back to the full weights"
    if gate == "capacity":
        assert r["dropped"] > 0, "the capacity case should drop pairs"
    else:  # dropless: every token's top_k pairs, each of the data-parallel batches counted once
        assert r["routed_tokens"][0] == r["routed_tokens"][1], r["routed_tokens"]


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory, worker_id):
    """EP=2 on 2 processes and EP=2 x expert-DP=2 on 4 processes (about 20 s together; once per session)."""
    return once(
        tmp_path_factory,
        worker_id,
        "megatron_ep_runs",
        lambda _: {"ep2": _slot_spawn(tmp_path_factory, 2, 2), "ep2_dp2": _slot_spawn(tmp_path_factory, 4, 2)},
    )


def slot_test(*layouts: str):
    """A multiprocess MoE-slot test over `layouts` x EP_GATES x EP_SYNCS (one spawn per layout, shared)."""

    def mark(fn):
        for m in (
            pytest.mark.parametrize("sync", EP_SYNCS),
            pytest.mark.parametrize("gate", EP_GATES),
            pytest.mark.parametrize("layout", layouts),
            pytest.mark.xdist_group("megatron_ep"),
            pytest.mark.multiprocess,
        ):
            fn = m(fn)
        return fn

    return mark


@slot_test("ep2", "ep2_dp2")
def test_expert_parallel_moe_slot_equals_one_process(ep_runs, layout, gate, sync):
    """MoeflowMoE built by the megatron spec under parallel_state EP: outputs, input/router/expert-shard
    grads and aux loss equal one moeflow MoELayer with the full weights on the global batch."""
    per_rank = ep_runs[layout]
    world = len(per_rank)
    for rank, res in enumerate(per_rank):
        r = res[f"{gate}/{sync}"]
        assert (r["ep_group_size"], r["edp_group_size"]) == (2, world // 2)
        _assert_slot_equals_one_process(rank, r, gate, sync)
        lo = r["ep_rank"] * 2
        assert r["shards"]["experts.w1_EDF"] == (4, lo, lo + 2) and r["shards"]["gate.proj.weight"] is None


@pytest.mark.multiprocess
@pytest.mark.xdist_group("megatron_ep")
def test_megatron_ddp_puts_moeflow_experts_in_its_expert_buffers(ep_runs):
    """megatron-core's DDP treats params marked allreduce=False as expert-parallel (reduced over
    the expert-data-parallel group): exactly the routed experts, not the router or shared expert."""
    experts = ["experts.w1_EDF", "experts.w2_EFD", "experts.w3_EDF"]
    for res in ep_runs["ep2_dp2"]:
        r = res["topk/megatron"]
        assert r["expert_buffer_params"] == experts
        assert sorted(n for n, a in r["allreduce"].items() if not a) == experts


# ---- tensor parallelism of the MoE slot through parallel_state (gloo, 2 and 4 processes) -----


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory, worker_id):
    """TP=2 on 2 processes and TP=2 x EP=2 on 4 (data-parallel 2; about 35 s together; once per session)."""
    return once(
        tmp_path_factory,
        worker_id,
        "megatron_tp_runs",
        lambda _: {
            "tp2": _slot_spawn(tmp_path_factory, 2, 1, tp=2),
            "tp2_ep2": _slot_spawn(tmp_path_factory, 4, 2, tp=2),
        },
    )


TP_SHARDED = [
    "experts.w1_EDF",
    "experts.w2_EFD",
    "experts.w3_EDF",
    "shared_expert.w1.weight",
    "shared_expert.w2.weight",
    "shared_expert.w3.weight",
]


@slot_test("tp2", "tp2_ep2")
def test_tensor_parallel_moe_slot_equals_one_process(tp_runs, layout, gate, sync):
    """MoeflowMoE under parallel_state TP=2 (experts and shared expert split on F, megatron's copy/reduce
    mappings, replicated gate): outputs, input/router grads, this rank's F-slice of the expert grads and
    the aux loss equal one moeflow MoELayer with the full weights; the checkpoint gathers F back."""
    per_rank = tp_runs[layout]
    world = len(per_rank)
    ep = 2 if layout == "tp2_ep2" else 1
    for rank, res in enumerate(per_rank):
        r = res[f"{gate}/{sync}"]
        assert (r["tp_group_size"], r["ep_group_size"], r["dp_group_size"]) == (2, ep, world // 2), r
        _assert_slot_equals_one_process(rank, r, gate, sync)
        lo = (rank % 2) * 12  # TP rank = rank % 2 (megatron's tp-first order); model.d_ff=24, shared 48
        assert r["tp_shards"]["experts.w1_EDF"] == (2, 24, lo, lo + 12) and r["tp_shards"]["experts.w2_EFD"] == (
            1,
            24,
            lo,
            lo + 12,
        )
        assert (
            r["tp_shards"]["shared_expert.w2.weight"] == (1, 48, 2 * lo, 2 * lo + 24)
            and r["tp_shards"]["gate.proj.weight"] is None
        )
        assert r["tp_attrs"] == TP_SHARDED, "megatron's tensor_model_parallel marker on exactly the F-sharded params"
        if ep == 2:
            assert r["shards"]["experts.w1_EDF"][1] == 2 * r["ep_rank"]


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_shard_hidden_dim_keeps_this_ranks_hidden_units(activation):
    """F/tp columns of w1/w3 and rows of w2 (routed and shared experts), the gate untouched, fused kernels off."""
    from moeflow.parallel.tensor_parallel import shard_hidden_dim

    layer = build_moe_layer(tiny(activation=activation, shared_experts=1, experts_impl="triton"))
    full = {n: p.detach().clone() for n, p in layer.named_parameters()}
    assert layer.experts.fuses_permute  # the fused kernels weight rows by the gate before a TP reduce could run
    sharded = shard_hidden_dim(layer, 1, 2)
    params = dict(layer.named_parameters())
    dims = {n: d for n, p in params.items() for q, d in sharded if p is q}
    assert sorted(dims) == sorted(n for n in params if "experts" in n or "shared_expert" in n)
    assert (
        params["experts.w1_EDF"].shape == (4, 32, 12)
        and params["experts.w2_EFD"].shape == (4, 12, 32)
        and layer.experts.d_ff == 12
    )
    assert torch.equal(params["experts.w1_EDF"], full["experts.w1_EDF"][:, :, 12:]) and torch.equal(
        params["experts.w2_EFD"], full["experts.w2_EFD"][:, 12:]
    )
    assert torch.equal(params["shared_expert.w1.weight"], full["shared_expert.w1.weight"][24:])
    assert dims["shared_expert.w2.weight"] == 1 and params["shared_expert.w2.weight"].shape[1] == 24
    assert all(torch.equal(full[n].chunk(2, d)[1], params[n]) for n, d in dims.items())  # rank 1's half on its dim
    assert "gate.proj.weight" not in dims and not layer.experts.fuses_permute


def test_tensor_parallel_size_must_divide_the_hidden_dims():
    from moeflow.parallel.tensor_parallel import shard_hidden_dim

    with pytest.raises(ValueError, match="tensor_model_parallel_size=5 does not divide model.d_ff=24") as err:
        shard_hidden_dim(build_moe_layer(tiny()), 0, 5)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="does not divide the shared expert's hidden size=36"):
        shard_hidden_dim(build_moe_layer(tiny(d_ff=24, shared_experts=1, dense_d_ff=36)), 0, 8)


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    """MegatronEngine with parallel.ep=2 on 4 gloo ranks (EP 2 x expert-DP 2), CPU (about 20 s)."""
    from helpers import ep_workers as W

    run_dir = tmp_path_factory.mktemp("mcore_engine_ep2_w4")
    return W.spawn("helpers.megatron_workers:engine_step", 4, run_dir, 2, str(run_dir / "run"))


@pytest.mark.multiprocess
@pytest.mark.xdist_group("megatron_ep")
def test_megatron_engine_applies_expert_parallelism(engine_run):
    """engine=megatron with parallel.ep=2 is not ignored: parallel_state gets expert_model_parallel_size=2,
    the model keeps this rank's experts, the wrapper is megatron-core's own DistributedDataParallel;
    one optimizer step (expert grads summed over expert-DP / world, norm with each shard once, AdamW) equals
    one process with all experts; the checkpoint holds all experts and their moments; resume reslices them.
    (GPTModel's forward needs CUDA: the 2-GPU run is the GPU check of forward/backward.)"""
    for rank, r in enumerate(engine_run):
        assert (r["ep_size"], r["edp_size"], r["ep_rank"]) == (2, 2, (rank % 2)), r
        assert r["wrapper"].startswith("megatron.core.") and r["wrapper"].endswith(".DistributedDataParallel")
        assert r["wrapped_model"]
        lo = r["ep_rank"] * 2
        assert r["shards"] and all(s == (4, lo, lo + 2) for s in r["shards"].values()), r["shards"]
        assert r["opt_numel"] == r["local_numel"], "the optimizer must hold this rank's expert shards only"
        got, want = r["grad_norm"]
        assert got == pytest.approx(want, rel=1e-5)
        assert r["resume_step"] == 1 and r["resume_weights"] == 0.0 and r["resume_moments"] == 0.0, r
    main = engine_run[0]
    assert main["saved_path"] and all(r["saved_path"] is None for r in engine_run[1:])
    assert main["weights"] < 1e-6, "the gathered checkpoint must equal one process's AdamW step"
    assert main["expert_moment_rows"] == [4], "the checkpoint's expert moments must cover all experts"


@pytest.fixture(scope="module")
def engine_run_tp(tmp_path_factory):
    """MegatronEngine with parallel.tp=2 on 2 gloo ranks, one dense (gated fc1) and one MoE block with a shared expert."""
    from helpers import ep_workers as W

    run_dir = tmp_path_factory.mktemp("mcore_engine_tp2_w2")
    return W.spawn(
        "helpers.megatron_workers:engine_step",
        2,
        run_dir,
        1,
        str(run_dir / "run"),
        "parallel.tp=2",
        "model.moe_every=2",
        "model.shared_experts=1",
    )


@pytest.mark.multiprocess
@pytest.mark.xdist_group("megatron_ep")
def test_megatron_engine_applies_tensor_parallelism(engine_run_tp):
    """parallel.tp=2: parallel_state's TP group, both ranks on the same batch, megatron's attention/
    embedding/dense-MLP slices and the MoE experts' F slices loaded from the full initial weights; one step
    (gradient norm summing TP slices once each, AdamW) equals one process; the checkpoint gathers every slice
    (gated fc1 = [w1; w3] blocks included) to the single-process weights; resume reslices weights and moments."""
    for rank, r in enumerate(engine_run_tp):
        assert (r["tp_size"], r["ep_size"], r["data_parallel_rank"]) == (2, 1, (0, 1)), r
        assert r["wrapper"].endswith(".DistributedDataParallel") and r["wrapped_model"]
        sliced = r["tp_sliced"]
        for part in (
            "self_attention.linear_qkv.weight",
            "self_attention.linear_proj.weight",
            "mlp.linear_fc1.weight",
            "mlp.moe.experts.w2_EFD",
            "mlp.moe.shared_expert",
            "embedding.word_embeddings.weight",
        ):
            assert any(part in n for n in sliced), (part, sliced)
        assert not any("router" in n or "gate" in n or "norm" in n for n in sliced), sliced
        assert r["dense_mlp"] < 1e-5, "megatron's TP dense MLP on the loaded slices must compute moeflow's MLP"
        local, full = r["local_vs_full"]
        assert local < full and r["opt_numel"] == local
        got, want = r["grad_norm"]
        assert got == pytest.approx(want, rel=1e-5)
        assert r["resume_step"] == 1 and r["resume_weights"] == 0.0 and r["resume_moments"] == 0.0, r
    main = engine_run_tp[0]
    assert main["saved_path"] and engine_run_tp[1]["saved_path"] is None
    assert main["weights"] < 1e-6, "the gathered checkpoint must equal one process's AdamW step"


# ---- megatron-core's router configured by router_config (CPU) -------------------------------

ROUTER_CASES = {
    "softmax_renormalized": {"aux_loss_coef": 0.01},
    "softmax_topk_before_softmax": {"topk_before_softmax": True, "z_loss_coef": 0.001},
    "softmax_raw_weights": {"renormalize": False, "seq_aux_loss_coef": 0.01, "aux_loss_coef": 0.01},
    "softmax_capacity": {"renormalize": False, "dropless": False, "capacity_factor": 0.5},
    "softmax_groups": {"topk_before_softmax": True, "n_groups": 2, "topk_groups": 1},
    "sigmoid_expert_bias_groups": {"score_func": "sigmoid", "bias_update_rate": 0.001, "n_groups": 2, "topk_groups": 1},
    "sigmoid_top1_raw": {"score_func": "sigmoid", "renormalize": False, "top_k": 1},
}


@pytest.mark.parametrize("case", ROUTER_CASES)
def test_megatron_router_routes_like_the_moeflow_gate(parallel_state, monkeypatch, case):
    """Exported router weights (and expert bias) in megatron-core's TopKRouter built from
    router_config: same experts and same weights per token as moeflow's gate (eval mode)."""
    from moeflow.parallel.integrations.megatron_core import build_native_gpt_model

    if not torch.cuda.is_available():  # megatron allocates the expert-bias buffers on the current CUDA device
        monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    opts = dict(ROUTER_CASES[case])
    mc = tiny(n_layers=1, num_experts=4, top_k=opts.pop("top_k", 2), gate={"name": "topk", **opts})
    state = random_state(mc, seed=7)
    if "blocks.0.ffn.gate.expert_bias_E" in state:  # a bias that changes the choice of experts
        state["blocks.0.ffn.gate.expert_bias_E"] = torch.tensor([0.3, -0.3, 0.2, 0.0])
    model = build_native_gpt_model(mc, "cpu", layout="sequential", dispatcher="allgather")
    missing, unexpected = model.load_state_dict(mck.to_megatron(state, mc), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    router = model.decoder.layers[0].mlp.router.eval()
    gate = build_moe_layer(mc).gate.eval()
    gate.load_state_dict(
        {k.split("blocks.0.ffn.gate.")[1]: v for k, v in state.items() if k.startswith("blocks.0.ffn.gate.")}
    )

    x_SBD = torch.randn(8, 4, mc.d_model, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        probs_TE, map_TE = router(x_SBD)
        out = gate(x_SBD.reshape(-1, mc.d_model))
    ours_TE = torch.zeros_like(probs_TE).index_put_((out.token_A, out.expert_A), out.weight_A)
    ours_map = torch.zeros_like(map_TE).index_put_((out.token_A, out.expert_A), torch.tensor(True))
    assert torch.equal(map_TE, ours_map)
    torch.testing.assert_close(probs_TE, ours_TE, rtol=1e-5, atol=1e-6)
    if not mc.gate.get("dropless", True):
        assert map_TE.sum() < x_SBD.shape[0] * x_SBD.shape[1] * mc.top_k, "the capacity case should drop pairs"
    if "bias_update_rate" in opts:
        assert torch.equal(
            mck.from_megatron(model.state_dict(), mc)["blocks.0.ffn.gate.expert_bias_E"],
            state["blocks.0.ffn.gate.expert_bias_E"],
        )


@pytest.mark.parametrize(
    "options, top_k, names",
    [
        ({"noise_std": 0.1}, 2, "gate.noise_std"),
        ({"score_func": "sigmoid", "renormalize": False}, 2, "gate.renormalize=False with gate.score_func=sigmoid"),
        ({"score_func": "sigmoid"}, 1, "gate.renormalize=True with gate.score_func=sigmoid and top_k=1"),
        ({}, 1, "gate.renormalize=true (or topk_before_softmax) with top_k=1"),
        ({"bias_update_rate": 0.001}, 2, "gate.bias_update_rate with gate.score_func=softmax"),
        ({"n_groups": 2, "topk_groups": 2, "topk_before_softmax": True}, 2, "gate.n_groups/topk_groups"),
        ({"n_groups": 2, "topk_groups": 1}, 2, "gate.n_groups with softmax scores and gate.renormalize=true"),
        (
            {"dropless": False, "capacity_factor": 1.0, "renormalize": False, "drop_policy": "position"},
            2,
            "gate.drop_policy=position",
        ),
        ({"dropless": False, "capacity_factor": 1.0}, 2, "gate.capacity_factor with renormalised weights"),
    ],
)
def test_export_refuses_router_options_megatron_cannot_reproduce(options, top_k, names):
    mc = tiny(top_k=top_k, gate={"name": "topk", **options})
    with pytest.raises(mck.ConversionError, match=re.escape(names)):
        mck.to_megatron(random_state(mc), mc)
    mck.to_megatron(random_state(mc), mc, native=False)  # moeflow's layer inside megatron keeps every option


def test_router_config_maps_losses_and_options():
    cfg = mck.router_config(
        tiny(
            gate={
                "name": "topk",
                "aux_loss_coef": 0.02,
                "seq_aux_loss_coef": 0.001,
                "z_loss_coef": 0.001,
                "jitter_eps": 0.01,
            }
        )
    )
    assert cfg["moe_router_load_balancing_type"] == ["aux_loss", "seq_aux_loss"] and cfg["moe_aux_loss_coeff"] == [
        0.02,
        0.001,
    ]
    assert (
        cfg["moe_z_loss_coeff"] == 0.001
        and cfg["moe_input_jitter_eps"] == 0.01
        and cfg["moe_router_pre_softmax"] is False
    )
    default = mck.router_config(tiny())  # TopKGate's own defaults, not 0
    assert (default["moe_router_load_balancing_type"], default["moe_aux_loss_coeff"]) == ("aux_loss", 0.01)


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="moeflow.configs", version_base=None):
        return hydra_compose(config_name="train", overrides=list(overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_engine_megatron_on_cpu_says_what_needs_a_gpu():
    from moeflow.launch.config import validate

    with pytest.raises(ConfigError, match="engine=megatron needs a CUDA GPU"):
        validate(compose("engine=megatron"))


def _validate_as_if_on_gpu(monkeypatch, world: int, *overrides: str):
    """Config validation of engine=megatron past its CUDA check (CPU here), under a torchrun world."""
    from moeflow.launch import config

    monkeypatch.setattr(config, "resolve_device", lambda name: torch.device("cuda", 0))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    return config.validate(compose("engine=megatron", "experts.impl=torch", *overrides))


def test_engine_megatron_accepts_a_possible_expert_parallel_layout(monkeypatch):
    mc, _ = _validate_as_if_on_gpu(monkeypatch, 4, "parallel.ep=2", "model.num_experts=8")
    assert mc.num_experts == 8


def test_engine_megatron_accepts_tensor_parallel_with_expert_parallel(monkeypatch):
    mc, _ = _validate_as_if_on_gpu(monkeypatch, 4, "parallel.tp=2", "parallel.ep=2", "model.num_experts=8")
    assert mc.num_experts == 8


@pytest.mark.parametrize(
    "overrides, message",
    [
        (("parallel.ep=3", "model.num_experts=8"), "parallel.ep=3 does not divide model.num_experts=8"),
        (("parallel.ep=8", "model.num_experts=8"), "parallel.ep=8 does not divide dp_shard x tp = 4"),
        (("parallel.tp=3",), "parallel.tp=3 x parallel.ep=1 does not divide the world size 4"),
        (("parallel.tp=4", "model.n_heads=2"), "parallel.tp=4 does not divide model.n_heads=2"),
        (("parallel.tp=2", "model.d_ff=25"), "parallel.tp=2 does not divide model.d_ff=25"),
        (
            ("parallel.tp=2", "parallel.ep=4", "model.num_experts=8"),
            "parallel.tp=2 x parallel.ep=4 does not divide the world size 4",
        ),
        (
            ("parallel.ep=2", "parallel.overlap_chunks=2"),
            "parallel.overlap_chunks/overlap_shared are not wired into engine=megatron",
        ),
    ],
)
def test_engine_megatron_refuses_impossible_layouts_in_one_line(monkeypatch, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        _validate_as_if_on_gpu(monkeypatch, 4, *overrides)
    assert "\n" not in str(err.value)


def test_unmappable_features_are_refused():
    for mc in (tiny(qk_norm=True), tiny(attn_bias=True)):
        with pytest.raises(mck.ConversionError, match="no megatron-core mapping"):
            mck.to_megatron(random_state(mc), mc)


def test_missing_megatron_names_the_extra(monkeypatch):
    import importlib.util

    from moeflow.launch.engines import check_engine

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.startswith("megatron") else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install moeflow\[megatron\]"):
        check_engine(compose("engine=megatron"), None, torch.device("cpu"))


def test_convert_cli_round_trip(tmp_path):
    """moeflow checkpoint -> megatron torch checkpoint -> moeflow checkpoint, through `moeflow convert`."""
    from moeflow.launch import checkpoint as ckpt

    mc = tiny(n_layers=4, moe_every=2, shared_experts=1)
    state = random_state(mc, seed=4)
    src = ckpt.save_checkpoint(tmp_path / "run", 7, state, {"step": 7}, {"model": mc.to_dict(), "config": {}})
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "moeflow.launch.cli", "convert", *a], capture_output=True, text=True, timeout=limit(120)
    )  # noqa: E731
    p = run("moeflow-to-megatron", str(src), str(tmp_path / "meg"), "--layout", "grouped")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "meg" / "latest_checkpointed_iteration.txt").read_text() == "7"
    assert mck.load_megatron(tmp_path / "meg")[1]["megatron_router_config"] == mck.router_config(mc)
    p = run("megatron-to-moeflow", str(tmp_path / "meg"), str(tmp_path / "back"), "--n-heads", "4", "--top-k", "2")
    assert p.returncode == 0, p.stderr
    out = ckpt.find_checkpoint(tmp_path / "back")
    assert out.name == "step_00000007"
    back = ckpt.load_model_state(out)
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], state[k]) for k in state)
    p = run("megatron-to-moeflow", str(tmp_path / "nothing"), str(tmp_path / "x"), "--n-heads", "4", "--top-k", "2")
    assert p.returncode == 2 and p.stderr.startswith("moeflow convert: error:") and p.stderr.strip().count("\n") == 0


# ---- GPU: megatron-core attention and GPTModel forward ---------------------------------------


def _moeflow_logits(mc, state, tokens):
    ref = Transformer(mc).cuda()
    ref.load_state_dict(state, strict=False)
    ref.eval()
    with torch.no_grad():
        return ref(tokens)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", CASES)
def test_gpt_model_with_moeflow_moe_equals_moeflow_transformer(parallel_state, case):
    """Whole megatron-core GPTModel (its attention, norms, rotary) with moeflow MoE layers == moeflow's model."""
    from moeflow.parallel.integrations.megatron_core import build_gpt_model, gpt_logits

    mc = CASES[case]
    state = random_state(mc, seed=5)
    model = build_gpt_model(mc, "cuda")
    model.load_state_dict({k: v.cuda() for k, v in mck.to_megatron(state, mc, native=False).items()}, strict=False)
    model.eval()
    tokens = torch.randint(0, mc.vocab_size, (3, mc.max_seq_len), device="cuda")
    with torch.no_grad():
        got = gpt_logits(model, tokens)
    torch.testing.assert_close(got, _moeflow_logits(mc, state, tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", ["swiglu", "interleaved_shared"])
def test_native_megatron_moe_with_imported_weights_equals_moeflow(parallel_state, case):
    """megatron-core's own MoE (router + SequentialMLP + all-to-all dispatcher) with exported weights == moeflow."""
    from moeflow.parallel.integrations.megatron_core import build_native_gpt_model, gpt_logits

    mc = CASES[case]
    state = random_state(mc, seed=6)
    model = build_native_gpt_model(mc, "cuda", layout="sequential", dispatcher="alltoall")
    model.load_state_dict({k: v.cuda() for k, v in mck.to_megatron(state, mc).items()}, strict=False)
    model.eval()
    tokens = torch.randint(0, mc.vocab_size, (3, mc.max_seq_len), device="cuda")
    with torch.no_grad():
        got = gpt_logits(model, tokens)
    torch.testing.assert_close(got, _moeflow_logits(mc, state, tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@gpu
def test_engine_megatron_trains_like_engine_torch(tmp_path):
    """`moeflow train engine=megatron` (megatron-core GPTModel + moeflow MoE) follows engine=torch's losses
    from the same initial weights, and writes moeflow checkpoints that engine=torch resumes."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = [
        "model.n_layers=2",
        "model.d_model=64",
        "model.d_ff=64",
        "model.num_experts=4",
        "data.max_bytes=200000",
        "data.batch_size=8",
        "data.seq_len=64",
        "trainer.steps=6",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.progress=false",
        "trainer.precision=fp32",
        "trainer.grad_accum=2",
        "trainer.ckpt_every=6",
    ]

    def run(name, *extra):
        p = subprocess.run(
            [sys.executable, "-m", "moeflow.launch.cli", "train", *common, f"hydra.run.dir={tmp_path / name}", *extra],
            capture_output=True,
            text=True,
            timeout=limit(300),
        )
        assert p.returncode == 0, p.stderr[-4000:]
        acc = EventAccumulator(str(tmp_path / name / "tensorboard"))
        acc.Reload()
        return {e.step: e.value for e in acc.Scalars("train/loss")}

    meg, ref = run("megatron", "engine=megatron"), run("torch")
    assert sorted(meg) == sorted(ref) == list(range(1, 7))
    assert meg[6] < meg[1]
    for step in ref:  # different attention kernels (megatron's unfused softmax vs SDPA): fp32 round-off only
        assert meg[step] == pytest.approx(ref[step], rel=2e-3), (step, meg, ref)
    ck = tmp_path / "megatron" / "checkpoints" / "step_00000006"
    cont = run("cont", f"resume={ck}", "trainer.steps=7")
    assert sorted(cont) == [7]
