"""Every gate inside the model: gradients reach the router, a few training steps run, state
survives a checkpoint round trip, and bad gate options fail before training starts.

Gates without a gradient by design: `hash` (no parameters: a fixed function of the
token id; its docstring says so). Every other gate is checked with autograd below.
"""

from __future__ import annotations

import pytest
import torch

from moeflow.moe.gates import GATES, build_gate
from moeflow.moe.model import ModelConfig, Transformer

D, E = 16, 8
LEARNED = sorted(set(GATES) - {"hash"})
OPTIONS = {"ssr": {"step_fraction": 1.0}, "dts": {"anneal_steps": 4}, "dts_act": {"anneal_steps": 4}}


@pytest.mark.parametrize("name", LEARNED)
@pytest.mark.parametrize("with_aux", [False, True])
def test_gradients_reach_the_router_parameters(name, with_aux):
    gate = build_gate(name, D, E, 2, **OPTIONS.get(name, {})).train()
    gate.set_step(2)  # mid-schedule for DTS
    x = torch.randn(64, D)
    out = gate(x)
    target = torch.randn(out.weight_A.shape)
    loss = (out.weight_A * target).sum()  # through the gating weights only ...
    if with_aux:
        loss = loss + out.aux_loss()  # ... or plus the gate's aux losses
    (grad,) = torch.autograd.grad(loss, gate.proj.weight)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_hash_gate_has_no_gradient_by_design():
    from moeflow.moe.gates import hash as hash_module

    assert "no gradient" in hash_module.__doc__
    gate = build_gate("hash", D, E, 2)
    assert list(gate.parameters()) == []
    assert not gate(torch.randn(8, D, requires_grad=True), torch.arange(8)).weight_A.requires_grad


def tiny_model(gate: dict) -> Transformer:
    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, d_ff=32, num_experts=4, top_k=2, gate=gate
    )
    return Transformer(cfg)


GATE_CONFIGS = [{"name": n, **OPTIONS.get(n, {})} for n in sorted(GATES)] + [
    {"name": "topk", "dropless": False, "capacity_factor": 1.0, "drop_policy": "position", "z_loss_coef": 1e-3},
    {
        "name": "topk",
        "score_func": "sigmoid",
        "bias_update_rate": 1e-2,
        "seq_aux_loss_coef": 1e-3,
        "n_groups": 2,
        "topk_groups": 1,
    },
]


@pytest.mark.parametrize("gate", GATE_CONFIGS, ids=lambda g: "-".join(f"{v}" for v in g.values()))
def test_each_gate_trains_inside_the_model(gate):
    torch.manual_seed(0)
    model = tiny_model(gate)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if ".gate." in n}
    x = torch.randint(0, 64, (4, 16))
    for step in range(3):
        for layer in model.moe_layers():
            layer.gate.set_step(step)
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()) + model.aux_loss()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, before in routers.items():
        assert not torch.equal(before, dict(model.named_parameters())[n]), f"router {n} did not move"
    for layer in model.moe_layers():
        assert "active_experts_per_token" in layer.last_stats and "tokens_per_expert" in layer.last_stats
    # gate state (e.g. the expert bias) is in the state dict and round-trips; schedules
    # are a function of the step the trainer sets (also after resume)
    state = model.state_dict()
    again = tiny_model(gate)
    again.load_state_dict(state)
    for layer in [*model.moe_layers(), *again.moe_layers()]:
        layer.gate.set_step(3)  # what the trainer calls next, resumed or not
    model.eval(), again.eval()
    torch.testing.assert_close(again(x), model(x))
    if gate.get("bias_update_rate"):
        assert sum(k.endswith("expert_bias_E") for k in state) == len(model.moe_layers())


@pytest.mark.parametrize(
    "args,words",
    [
        (["gate=topk", "gate.capacity_factor=1.25"], ["gate.capacity_factor", "dropless"]),
        (["gate=topk", "gate.dropless=false"], ["capacity_factor"]),
        (
            ["gate=topk", "gate.drop_policy=random", "gate.dropless=false", "gate.capacity_factor=1.0"],
            ["drop_policy", "score", "position"],
        ),
        (["gate=dts", "gate.threshold=1.5"], ["gate.threshold", "(0, 1)"]),
        (["model.top_k=9"], ["top_k"]),
        (["gate=nope"], ["gate"] + sorted(GATES)),
    ],
)
def test_bad_gate_options_fail_before_training(args, words, capsys, tmp_path):
    from moeflow.launch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", *args, f"hydra.run.dir={tmp_path}/run"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeflow train: error: ") and "\n" not in err
    for w in words:
        assert w in err
