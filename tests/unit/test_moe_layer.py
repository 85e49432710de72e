"""The MoE layer and the LM: shapes, gradients, and function preservation against a dense MLP."""

import pytest
import torch

from moeflow.moe import MLP, GroupedExperts, ModelConfig, MoELayer, Transformer, build_gate, plan_dispatch
from moeflow.moe.experts import expert_mlp


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_identical_experts_with_renormalised_topk_equal_dense_mlp(activation):
    torch.manual_seed(0)
    d, f, E, K = 16, 24, 6, 3
    dense = MLP(d, f, activation).double()
    experts = GroupedExperts(E, d, f, activation).double()
    experts.load_from_mlp(dense)
    gate = build_gate("topk", d, E, K, renormalize=True).double()
    layer = MoELayer(gate, experts)
    x = torch.randn(5, 7, d, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-12, atol=1e-12)


def test_moe_layer_matches_explicit_per_token_sum():
    """y_t = sum_k w_tk * expert_{e_tk}(x_t), computed token by token in float64."""
    torch.manual_seed(1)
    d, f, E, K = 8, 12, 5, 2
    experts = GroupedExperts(E, d, f).double()
    gate = build_gate("topk", d, E, K).double()
    layer = MoELayer(gate, experts)
    x_TD = torch.randn(9, d, dtype=torch.float64)
    routing = gate(x_TD)
    expected = torch.zeros_like(x_TD)
    for t, e, w in zip(routing.token_A.tolist(), routing.expert_A.tolist(), routing.weight_A):
        expected[t] += w * expert_mlp(x_TD[t : t + 1], experts.w1_EDF[e], experts.w3_EDF[e], experts.w2_EFD[e])[0]
    torch.testing.assert_close(layer(x_TD), expected)


def test_dispatch_plan_groups_rows_by_expert():
    torch.manual_seed(2)
    gate = build_gate("topk", 8, 4, 2)
    routing = gate(torch.randn(10, 8))
    plan = plan_dispatch(routing)
    assert torch.all(plan.expert_A[1:] >= plan.expert_A[:-1])
    assert (
        plan.counts_E.sum().item() == 20
        and plan.counts_E.tolist() == torch.bincount(routing.expert_A, minlength=4).tolist()
    )


@pytest.mark.parametrize("num_values", [2, 255, 256, 257, 2**15, 2**15 + 1])
def test_stable_order_matches_argsort_at_every_key_width(num_values):
    """The expert sort runs on the narrowest integer type (one radix pass per byte); the ids at
    each width's edge must still sort exactly like the int64 argsort, ties in order."""
    from moeflow.moe.gates.common import stable_order

    torch.manual_seed(num_values)
    ids = torch.cat([torch.randint(0, num_values, (4000,)), torch.tensor([num_values - 1, 0, num_values - 1])])
    assert torch.equal(stable_order(ids, num_values), torch.argsort(ids, stable=True))


@pytest.mark.parametrize("moe_every,shared", [(1, 0), (2, 1)])
def test_lm_forward_backward_shapes_and_grads(moe_every, shared):
    torch.manual_seed(3)
    cfg = ModelConfig(
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=16,
        num_experts=4,
        top_k=2,
        max_seq_len=16,
        moe_every=moe_every,
        shared_experts=shared,
    )
    model = Transformer(cfg)
    tokens = torch.randint(0, 256, (3, 16))
    logits = model(tokens)
    assert logits.shape == (3, 16, 256)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + model.aux_loss()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert len(model.moe_layers()) == (2 if moe_every == 1 else 1)
    assert model.aux_loss().item() > 0


def test_causality():
    """Changing a later token never changes earlier logits."""
    torch.manual_seed(4)
    model = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=16, num_experts=4, max_seq_len=16)).eval()
    a = torch.randint(0, 256, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 256
    torch.testing.assert_close(model(a)[0, :10], model(b)[0, :10])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(top_k=9, num_experts=8), "top_k=9 is larger than model.num_experts=8"),
        (dict(d_model=30, n_heads=4), "not divisible by model.n_heads"),
        (dict(activation="relu"), "activation"),
        (dict(gate={"name": "nope"}), "known gates: .*topk"),
    ],
)
def test_model_config_rejects_impossible_shapes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_gate_rejects_unknown_option():
    with pytest.raises(ValueError, match="has no option.*its options are"):
        build_gate("topk", 8, 4, 2, capacity_factr=1.0)


def test_load_balance_loss_is_one_for_uniform_routing():
    gate = build_gate("topk", 4, 4, 1, aux_loss_coef=1.0, init_std=0.0)
    # zero router: uniform probabilities; top-1 ties resolve to some expert, so force a uniform
    # assignment pattern and check E * sum f_e P_e with P_e = 1/E gives exactly 1.
    probs = torch.full((8, 4), 0.25)
    expert_TK = torch.arange(8).remainder(4).unsqueeze(1)
    assert gate.load_balance_loss(probs, expert_TK).item() == pytest.approx(1.0)


@pytest.mark.parametrize("scope", ["head", "proj"])
def test_qk_norm_under_autocast_takes_the_fused_kernel_with_the_same_values(scope):
    """bf16 q/k with an fp32 norm weight: once torch's unfused fallback (with a warning), now the fused
    fp32 kernel; the values are the fallback's to bf16 rounding."""
    import warnings

    import torch.nn.functional as F

    from moeflow.moe.model import norm_like_input

    norm = torch.nn.RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.add_(torch.randn(16) * 0.3)
    x = torch.randn(4, 3, 16).bfloat16()
    want = F.rms_norm(x.double(), (16,), norm.weight.double(), 1e-6)  # float64 reference
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Mismatch dtype ... Cannot dispatch to fused implementation"
        got = norm_like_input(norm, x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=8e-3, atol=8e-3)  # bf16 rounding of the output
    from moeflow.moe.config import ModelConfig
    from moeflow.moe.model import Transformer

    model = Transformer(
        ModelConfig(
            d_model=32, n_layers=1, n_heads=4, d_ff=32, num_experts=2, max_seq_len=16, qk_norm=True, qk_norm_scope=scope
        )
    )
    with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.filterwarnings("error", message=".*Mismatch dtype.*")
        model(torch.randint(0, 256, (2, 8)))
