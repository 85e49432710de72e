"""Expert choice, dense-to-sparse, Sinkhorn/SSR and hash gates: each one's defining property."""

from __future__ import annotations

import math

import pytest
import torch

from moeflow.moe.gates import GATES, build_gate
from moeflow.moe.gates.sinkhorn import balanced_topk, sinkhorn_potentials, transport_kernel

D, E = 16, 8


def rand_x(T=256):
    return torch.randn(T, D, generator=torch.Generator().manual_seed(torch.seed() % 2**31))


def active_per_token(out):
    return torch.bincount(out.token_A, minlength=out.num_tokens)


# -- expert choice ----------------------------------------------------------------------


@pytest.mark.parametrize("T,k,factor", [(256, 2, 1.0), (100, 1, 1.0), (64, 2, 2.0), (37, 3, 0.5)])
def test_expert_choice_gives_every_expert_exactly_its_capacity(T, k, factor):
    gate = build_gate("expert_choice", D, E, k, capacity_factor=factor)
    x = rand_x(T)
    x[: T // 4] = x[0]  # identical tokens (tied scores) must not break the exact count
    out = gate(x)
    c = min(T, math.ceil(factor * T * k / E))
    assert torch.equal(torch.bincount(out.expert_A, minlength=E), torch.full((E,), c))
    pairs = out.token_A * E + out.expert_A
    assert pairs.unique().numel() == pairs.numel()
    # each expert holds its c best-scoring tokens
    probs_TE = gate.proj(x).softmax(-1)
    for e in range(E):
        mine = out.token_A[out.expert_A == e]
        others = torch.ones(T, dtype=torch.bool)
        others[mine] = False
        if others.any():
            assert probs_TE[mine, e].min() >= probs_TE[others, e].max()
    unrouted = (active_per_token(out) == 0).float().mean()
    assert out.stats["dropped_fraction"].item() == pytest.approx(unrouted.item())


# -- dense-to-sparse ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dts", "dts_act"])
@pytest.mark.parametrize("k", [1, 2])
def test_dts_starts_dense_ends_at_most_k_and_never_grows(name, k):
    gate = build_gate(name, D, E, k, anneal_steps=50, temperature_start=3.0, temperature_end=0.1, threshold=0.1).eval()
    with torch.no_grad():
        gate.proj.weight.normal_(std=0.5)  # spread logits so that the threshold acts before the cap
    x = rand_x(128)
    previous = None
    seen = set()
    for step in range(0, 56):
        gate.set_step(step)
        counts = active_per_token(gate(x))
        if step == 0:
            assert (counts == E).all()  # every expert for every token
        if previous is not None:
            assert (counts <= previous).all()  # never increases as the temperature falls
        previous = counts
        seen.add(round(counts.float().mean().item(), 3))
    assert (previous <= k).all() and (previous >= 1).all()
    assert len(seen) > 4  # it falls gradually, not in one jump
    assert gate.temperature() == pytest.approx(0.1)


def test_dts_threshold_drops_experts_adaptively_before_the_cap():
    """Confident tokens lose experts earlier than uncertain ones."""
    gate = build_gate("dts", D, E, 2, anneal_steps=100, threshold=0.1).eval()
    with torch.no_grad():
        gate.proj.weight.zero_()
        gate.proj.weight[0, 0] = 4.0
    x = rand_x(64)
    x[:32, 0] = 2.0  # confident: expert 0 dominates
    x[32:, 0] = 0.0  # uniform logits: every expert equal
    gate.set_step(30)
    counts = active_per_token(gate(x))
    assert (counts[:32] < counts[32:]).all()


def test_dts_gumbel_noise_only_in_training_and_schedule_in_stats():
    gate = build_gate("dts", D, E, 2, gumbel_noise=True)
    x = rand_x(32)
    gate.eval()
    a, b = gate(x), gate(x)
    assert torch.equal(a.weight_A, b.weight_A)
    gate.train()
    assert not torch.equal(gate(x).weight_A, gate(x).weight_A)
    gate.set_step(10**6)
    stats = gate(x).stats
    assert stats["temperature"].item() == pytest.approx(0.3) and stats["max_active_experts"].item() == 2


@pytest.mark.parametrize(
    "opts,word",
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 0.2}, "1/num_experts"),
        ({"temperature_end": 3.0}, "temperature"),
        ({"anneal_steps": 0}, "anneal_steps"),
        ({"router_activation": "swish"}, "router_activation"),
    ],
)
def test_dts_bad_options(opts, word):
    with pytest.raises(ValueError, match=word):
        build_gate("dts", D, E, 2, **opts)


# -- Sinkhorn ----------------------------------------------------------------------------


def skewed_gate(name, k=1, **opts):
    gate = build_gate(name, D, E, k, **opts).train()
    with torch.no_grad():
        gate.proj.weight.normal_(std=0.25)
        gate.proj.weight[0, 0] = 1.0
    x = rand_x(2048)
    x[:, 0] = 4.0  # expert 0 strongly preferred by every token
    return gate, x


def load_ratio(expert_A):
    counts = torch.bincount(expert_A, minlength=E).float()
    return (counts.max() / counts.mean()).item()


@pytest.mark.parametrize("k", [1, 2])
def test_sinkhorn_balances_skewed_logits_where_topk_does_not(k):
    gate, x = skewed_gate("sinkhorn", k)
    plain = build_gate("topk", D, E, k)
    plain.proj.load_state_dict(gate.proj.state_dict())
    assert load_ratio(plain(x).expert_A) > 3
    out = gate(x)
    assert load_ratio(out.expert_A) <= 1.1
    assert torch.equal(active_per_token(out), torch.full((x.shape[0],), k))
    # gating weights come from the router's own scores
    probs = gate.proj(x).softmax(-1)[out.token_A, out.expert_A].view(-1, k)
    torch.testing.assert_close(out.weight_A.view(-1, k), probs / probs.sum(-1, keepdim=True))


@pytest.mark.parametrize("name", ["sinkhorn", "ssr"])
def test_transport_balances_a_freshly_initialised_router(name):
    """Tiny init logits: the relative epsilon keeps the hard assignment balanced (top-k is not)."""
    gate = build_gate(name, D, E, 2, step_fraction=1.0) if name == "ssr" else build_gate(name, D, E, 2)
    x = rand_x(2048)
    x[:, 0] += 2.0  # a shared feature the random router reads -> a mild skew
    assert load_ratio(gate(x).expert_A) <= 1.1
    gate.eval()
    assert load_ratio(gate(x).expert_A) > 1.2


@pytest.mark.parametrize("tol", [1e-2, 1e-4])
def test_sinkhorn_marginals_match_targets_within_tolerance(tol):
    gate = build_gate("sinkhorn", D, E, 1)
    T = 300
    logk = torch.randn(T, E, dtype=torch.float64) * 2
    logk[:, 3] += 3
    a, b, iters, err = sinkhorn_potentials(gate, logk, 1000, tol)
    P = (logk + a.double().unsqueeze(1) + b.double()).exp()  # float64 reference of the map
    assert iters < 1000 and err.item() <= tol
    assert (P.sum(1) - 1).abs().max().item() <= tol * 1.01
    assert (P.sum(0) / (T / E) - 1).abs().max().item() <= max(tol, 1e-5)


def test_sinkhorn_runs_in_float32_under_bf16_autocast():
    gate, x = skewed_gate("sinkhorn", 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = gate.proj(x)
        assert logits.dtype == torch.bfloat16
        a, b, iters, err = sinkhorn_potentials(gate, transport_kernel(gate, logits, gate.epsilon), 200, 1e-3)
        out = gate(x)
    assert a.dtype == b.dtype == torch.float32
    assert err.item() <= 1e-3
    assert load_ratio(out.expert_A) <= 1.1


def test_sinkhorn_eval_routes_by_plain_topk_unless_asked():
    gate, x = skewed_gate("sinkhorn", 1)
    gate.eval()
    assert torch.equal(gate(x).expert_A, gate.proj(x).argmax(-1))
    gate.balance_in_eval = True
    assert load_ratio(gate(x).expert_A) <= 1.1


def test_ssr_transports_on_the_chosen_fraction_of_steps_with_weights_from_the_map():
    gate, x = skewed_gate("ssr", 2, step_fraction=0.25)
    used = []
    for step in range(400):
        gate.set_step(step)
        used.append(gate.transport_step())
    assert sum(used) / len(used) == pytest.approx(0.25, abs=0.01)
    step_ot = used.index(True)
    step_plain = used.index(False)
    gate.set_step(step_plain)
    out = gate(x)
    assert load_ratio(out.expert_A) > 3 and out.stats["transported_fraction"] == 0
    gate.set_step(step_ot)
    out = gate(x)
    assert load_ratio(out.expert_A) <= 1.1 and out.losses == {}
    # weights: the transport map's entries on the chosen experts, renormalised
    logk = transport_kernel(gate, gate.proj(x).float(), gate.epsilon)
    expert_TK, b_KE, _, _ = balanced_topk(gate, logk, 2, gate.iterations, gate.tolerance)
    assert torch.equal(out.expert_A.view(-1, 2), expert_TK)
    P1 = (logk + b_KE[0]).gather(1, expert_TK[:, :1]).exp()  # P_te up to the row constant exp(a_t)
    P2 = (logk + b_KE[1]).gather(1, expert_TK[:, 1:]).exp()
    w = torch.cat([P1, P2], 1)
    torch.testing.assert_close(out.weight_A.view(-1, 2), w / w.sum(-1, keepdim=True), rtol=1e-4, atol=1e-6)


def test_ssr_token_fraction_transports_about_that_share_of_tokens():
    gate, x = skewed_gate("ssr", 1, step_fraction=1.0, token_fraction=0.3)
    out = gate(x)
    assert out.stats["transported_fraction"].item() == pytest.approx(0.3, abs=0.05)
    plain = gate.proj(x).argmax(-1)
    assert (out.expert_A != plain).float().mean() > 0.05  # some tokens moved by the transport


@pytest.mark.parametrize(
    "name,opts,word",
    [
        ("sinkhorn", {"iterations": 0}, "iterations"),
        ("sinkhorn", {"tolerance": 0}, "tolerance"),
        ("sinkhorn", {"epsilon": -1.0}, "epsilon"),
        ("ssr", {"step_fraction": 0.0}, "step_fraction"),
        ("ssr", {"token_fraction": 1.5}, "token_fraction"),
        ("expert_choice", {"capacity_factor": 0}, "capacity_factor"),
    ],
)
def test_bad_options(name, opts, word):
    with pytest.raises(ValueError, match=word):
        build_gate(name, D, E, 2, **opts)


# -- hash -----------------------------------------------------------------------------


def test_hash_routing_is_a_fixed_function_of_the_token_id():
    gate = build_gate("hash", D, E, 2)
    assert list(gate.parameters()) == []
    ids = torch.randint(0, 50_000, (4096,))
    a = gate(rand_x(4096), ids)
    b = gate(rand_x(4096), ids)  # other activations, same ids -> same experts
    assert torch.equal(a.expert_A, b.expert_A)
    e_TK = a.expert_A.view(-1, 2)
    assert (e_TK[:, 0] != e_TK[:, 1]).all()
    same = ids == ids[0]
    assert (e_TK[same] == e_TK[0]).all()
    assert load_ratio(a.expert_A) < 1.3  # roughly balanced over ids
    assert torch.allclose(a.weight_A, torch.full_like(a.weight_A, 0.5))
    with pytest.raises(ValueError, match="token"):
        gate(rand_x(8), None)


# -- every gate --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GATES))
def test_every_gate_builds_on_the_meta_device(name):
    with torch.device("meta"):
        gate = build_gate(name, D, E, 2)
    assert all(p.device.type == "meta" for p in gate.parameters())


def test_unknown_gate_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        build_gate("switchh", D, E, 2)
    for name in GATES:
        assert name in str(e.value)
