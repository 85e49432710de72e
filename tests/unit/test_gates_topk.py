"""Top-k token choice: each option's defining property on fresh random inputs."""

from __future__ import annotations

import math

import pytest
import torch

from moeflow.moe.experts import GroupedExperts
from moeflow.moe.gates import build_gate
from moeflow.moe.gates.base import SequenceShape
from moeflow.moe.layer import MoELayer

D, E = 16, 8


def rand_x(T=256, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    return torch.randn(T, D, generator=g)


def per_token(out):
    return torch.bincount(out.token_A, minlength=out.num_tokens)


VARIANTS = [
    {},
    {"score_func": "sigmoid"},
    {"topk_before_softmax": True},
    {"n_groups": 4, "topk_groups": 2},
    {"score_func": "sigmoid", "bias_update_rate": 0.01, "n_groups": 2, "topk_groups": 1},
    {"jitter_eps": 0.1, "noise_std": 0.5, "z_loss_coef": 1e-3, "seq_aux_loss_coef": 1e-3},
]


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("opts", VARIANTS)
def test_dropless_exactly_k_distinct_experts_and_renormalised_weights(k, opts):
    gate = build_gate("topk", D, E, k, **opts).train()
    out = gate(rand_x())
    assert torch.equal(per_token(out), torch.full((out.num_tokens,), k))
    pairs = out.token_A * E + out.expert_A
    assert pairs.unique().numel() == pairs.numel()  # k *distinct* experts
    sums = torch.zeros(out.num_tokens).index_add(0, out.token_A, out.weight_A.float())
    torch.testing.assert_close(sums, torch.ones(out.num_tokens))
    assert (out.weight_A > 0).all()


def test_group_limited_routing_uses_at_most_topk_groups():
    gate = build_gate("topk", D, E, 3, n_groups=4, topk_groups=2)
    out = gate(rand_x())
    groups_TE = torch.zeros(out.num_tokens, 4, dtype=torch.bool)
    groups_TE[out.token_A, out.expert_A // 2] = True
    assert (groups_TE.sum(-1) <= 2).all()


@pytest.mark.parametrize("policy", ["score", "position"])
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25])
def test_capacity_never_exceeded_and_drops_reported(policy, factor):
    T, K = 200, 2
    gate = build_gate("topk", D, E, K, dropless=False, capacity_factor=factor, drop_policy=policy)
    x = rand_x(T)
    with torch.no_grad():
        gate.proj.weight[0] += 0.5  # skew toward expert 0 so that it overflows
    out = gate(x)
    capacity = math.ceil(factor * T * K / E)
    counts = torch.bincount(out.expert_A, minlength=E)
    assert counts.max() <= capacity
    assert counts.max() == capacity  # the skewed expert is full, not under-filled
    dropped = 1 - out.expert_A.numel() / (T * K)
    assert dropped > 0
    assert out.stats["dropped_fraction"].item() == pytest.approx(dropped)


@pytest.mark.parametrize("policy", ["score", "position"])
def test_drop_policy_keeps_the_right_assignments(policy):
    T, K = 128, 2
    gate = build_gate("topk", D, E, K, dropless=False, capacity_factor=0.75, drop_policy=policy)
    x = rand_x(T)
    dense = build_gate("topk", D, E, K)
    dense.load_state_dict(gate.state_dict())
    full, kept = dense(x), gate(x)
    probs_TE = gate.proj(x).softmax(-1)
    kept_set = set(zip(kept.token_A.tolist(), kept.expert_A.tolist()))
    slot_A = torch.arange(K).repeat(T)  # slot of each assignment in the dropless output (token-major)
    for e in range(E):
        sel = full.expert_A == e
        toks, slots = full.token_A[sel], slot_A[sel]
        is_kept = torch.tensor([(t, e) in kept_set for t in toks.tolist()])
        if is_kept.all():
            continue
        if policy == "score":
            assert probs_TE[toks[is_kept], e].min() >= probs_TE[toks[~is_kept], e].max()
        else:  # first choices before second choices, then earlier tokens
            order = slots * T + toks
            assert order[is_kept].max() < order[~is_kept].min()


def test_dropped_tokens_pass_through_the_residual():
    """A token whose every assignment was dropped gets exactly zero MoE output (the block adds x)."""
    T, K = 64, 1
    gate = build_gate("topk", D, E, K, dropless=False, capacity_factor=0.25)
    layer = MoELayer(gate, GroupedExperts(E, D, 32, "swiglu"))
    x = rand_x(T)
    y = layer(x)
    routed = torch.zeros(T, dtype=torch.bool)
    routed[gate(x).token_A] = True
    assert (~routed).any()
    assert torch.equal(y[~routed], torch.zeros_like(y[~routed]))
    assert (y[routed].abs().sum(-1) > 0).all()


def _hand_gate(**opts):
    gate = build_gate("topk", 2, 2, 1, **opts)
    with torch.no_grad():
        gate.proj.weight.copy_(torch.eye(2))
    ln3 = math.log(3)
    x = torch.tensor([[ln3, 0.0], [ln3, 0.0], [0.0, ln3], [ln3, 0.0]])
    return gate, x


def test_switch_aux_loss_equals_hand_computed_value():
    # probs rows (.75,.25),(.75,.25),(.25,.75),(.75,.25); top-1 -> experts 0,0,1,0
    # f = (3/4, 1/4), P = (.625, .375): aux = 2 * (.75*.625 + .25*.375) = 1.125
    gate, x = _hand_gate(aux_loss_coef=0.01, z_loss_coef=0.1)
    out = gate(x)
    assert out.losses["load_balance"].item() == pytest.approx(0.01 * 1.125, rel=1e-6)
    # z-loss: every row's logsumexp is log(3 + 1)
    assert out.losses["z_loss"].item() == pytest.approx(0.1 * math.log(4) ** 2, rel=1e-6)


def test_sequence_aux_loss_is_the_mean_of_per_sequence_switch_losses():
    gate, x = _hand_gate(aux_loss_coef=0.0, seq_aux_loss_coef=1.0)
    gate.sequence_shape = SequenceShape(
        seq_len=2
    )  # sequences: rows (0, 1) -> both expert 0; rows (2, 3) -> experts 1, 0
    out = gate(x)
    seq1 = 2 * (1.0 * 0.75 + 0.0 * 0.25)  # f = (1, 0), P = (.75, .25)
    seq2 = 2 * (0.5 * 0.5 + 0.5 * 0.5)  # f = (.5, .5), P = (.5, .5)
    assert out.losses["seq_load_balance"].item() == pytest.approx((seq1 + seq2) / 2, rel=1e-6)


@pytest.mark.parametrize("layout", ["bsd", "sbd"])
def test_sequence_balance_loss_groups_each_layouts_sequences(layout):
    """[batch, seq, dim] (moeflow) and [seq, batch, dim] (megatron-core) inputs holding the same
    sequences give the same sequence-level loss, equal to the float64 per-sequence reference."""
    torch.manual_seed(0)
    B, S, E, K = 3, 5, 4, 2  # B != S: a layer that took the batch axis for the sequence axis groups other tokens
    gate = build_gate("topk", D, E, K, aux_loss_coef=0.0, seq_aux_loss_coef=1.0).double()
    layer = MoELayer(gate, GroupedExperts(E, D, 8), input_layout=layout).double()
    x_BSD = torch.randn(B, S, D, dtype=torch.float64)
    layer(x_BSD if layout == "bsd" else x_BSD.transpose(0, 1).contiguous())
    want = []
    for b in range(B):  # each sequence on its own: E * sum_e f_e * P_e
        probs = torch.softmax(gate.proj(x_BSD[b]), -1)
        f = torch.zeros(E, dtype=torch.float64).index_add_(
            0, probs.topk(K, -1).indices.reshape(-1), torch.ones(S * K, dtype=torch.float64)
        ) / (S * K)
        want.append(E * (f * probs.mean(0)).sum())
    assert layer.last_stats["loss/seq_load_balance"].item() == pytest.approx(
        torch.stack(want).mean().item(), rel=1e-6
    )  # the loss sums in float32


def test_expert_bias_balancing_lowers_max_over_mean_load_on_skewed_logits():
    T, K = 512, 2
    gate = build_gate("topk", D, E, K, score_func="sigmoid", aux_loss_coef=0.0, bias_update_rate=0.01).train()
    with torch.no_grad():
        gate.proj.weight.normal_(std=0.3)
        gate.proj.weight[:2, 0] += 1.0  # experts 0 and 1 read a feature every token has
    x = rand_x(T)
    x[:, 0] += 3.0

    def max_over_mean():
        counts = torch.bincount(gate(x).expert_A, minlength=E).float()
        return (counts.max() / counts.mean()).item()

    before = max_over_mean()
    gate.load_accum_E.zero_()
    history = []
    for step in range(1, 151):
        history.append(max_over_mean())  # the forward accumulates load ...
        gate.set_step(step)  # ... the trainer's step hook applies it
    assert before > 2.0
    assert min(history[-20:]) < 1.3 and history[-1] < before / 1.5
    assert "expert_bias_E" in gate.state_dict() and "load_accum_E" in gate.state_dict()
    # the bias only selects: weights are still the (renormalised) raw sigmoid scores
    out = gate(x)
    s = gate.proj(x).sigmoid()
    w = s[out.token_A, out.expert_A].view(T, K)
    torch.testing.assert_close(out.weight_A.view(T, K), w / w.sum(-1, keepdim=True))


def test_eval_mode_does_not_touch_the_bias_state():
    gate = build_gate("topk", D, E, 2, bias_update_rate=0.01).eval()
    gate(rand_x())
    assert gate.load_accum_E.sum() == 0
    gate.set_step(1)
    assert gate.expert_bias_E.abs().sum() == 0


BAD = [
    ({"dropless": True, "capacity_factor": 1.25}, "capacity_factor"),
    ({"dropless": False}, "capacity_factor"),
    ({"dropless": False, "capacity_factor": -1.0}, "capacity_factor"),
    ({"dropless": False, "capacity_factor": 1.0, "drop_policy": "random"}, "drop_policy"),
    ({"score_func": "relu"}, "score_func"),
    ({"score_func": "sigmoid", "topk_before_softmax": True}, "topk_before_softmax"),
    ({"aux_loss_coef": -0.1}, "aux_loss_coef"),
    ({"jitter_eps": 1.5}, "jitter_eps"),
    ({"n_groups": 3, "topk_groups": 1}, "n_groups"),
    ({"n_groups": 4}, "topk_groups"),
    ({"n_groups": 4, "topk_groups": 5}, "topk_groups"),
    ({"n_groups": 8, "topk_groups": 1}, "topk_groups"),  # k=2 > 1 group of 1 expert
]


@pytest.mark.parametrize("opts,word", BAD)
def test_inconsistent_options_fail_in_the_constructor_naming_the_option(opts, word):
    with pytest.raises(ValueError, match=word):
        build_gate("topk", D, E, 2, **opts)


def test_k_larger_than_experts_fails():
    with pytest.raises(ValueError, match="top_k"):
        build_gate("topk", D, E, E + 1)


@pytest.mark.parametrize("name", ["topk", "ssr"])
def test_routing_statistics_stay_on_the_routing_device(name):
    """A CPU scalar among them (`torch.tensor(0.0)`) put a C++ kernel into every compiled GPU graph:
    Inductor's cold CPU-compiler check alone took ~8 s of the first compiled step on an H100 host.
    The meta device stands in for a GPU (any device but the CPU shows the leak)."""
    from moeflow.moe.gates import build_gate
    from moeflow.moe.stats import routing_stats

    gate = build_gate(name, 16, 4, 2).to("meta")  # no device context: that would move CPU factories too
    stats = routing_stats(gate.route(torch.randn(10, 16, device="meta")))
    assert stats and {k: v.device.type for k, v in stats.items() if v.device.type != "meta"} == {}


def test_the_bias_update_and_a_dense_models_aux_loss_read_nothing_to_the_host():
    """Each was a host read per step (`bool(load.sum() > 0)`; a CPU zero moved to the GPU per micro-batch):
    on the meta device a host read raises, and a CPU tensor shows."""
    from moeflow.moe.config import ModelConfig
    from moeflow.moe.gates import build_gate
    from moeflow.moe.model import Transformer

    gate = build_gate("topk", 16, 4, 2, bias_update_rate=0.01).to("meta")
    gate.route(torch.randn(10, 16, device="meta"))
    gate.set_step(1)
    dense = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=16, moe_every=0, max_seq_len=8)).to("meta")
    assert dense.aux_loss().device.type == "meta"
