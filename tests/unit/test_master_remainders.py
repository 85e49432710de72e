"""optim.master_remainders: the fp32 master weight kept as its low 16 bits beside the model's bf16
weight (kernels/adamw.py, launch/optim.py), against the full fp32 master path and torch's bits."""

from __future__ import annotations

import pytest
import torch

from moeflow.kernels.adamw import adamw_master_step, adamw_reference, join_master, split_master
from moeflow.launch.optim import MasterWeightAdamW, bf16_compute_params, optimizer_groups, train_state_bytes
from moeflow.moe.config import ModelConfig
from moeflow.moe.model import Transformer


def _random_bits(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    edges = [0, -(2**31), 0x7F7FFFFF, 0x7F800000, -0x800000, 0x3F808000, 0x3F818000, 0x8000, -0x7FFF8000, 1, -1]
    return torch.cat(
        [torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64), torch.tensor(edges)]
    ).to(torch.int32)


def test_the_two_halves_are_the_fp32_bits_and_the_high_half_is_the_bf16_cast_but_at_ties():
    bits = _random_bits(300_000, 0)
    w = bits.view(torch.float32)
    high, low = split_master(w)
    assert high.dtype == torch.bfloat16 and low.dtype == torch.int16 and high.shape == w.shape
    back = join_master(high, low)
    nan = w.isnan()
    assert torch.equal(back.view(torch.int32)[~nan], bits[~nan])  # every non-NaN fp32 value, bit for bit
    assert back[nan].isnan().all() and high[nan].float().isnan().all()  # a NaN stays a NaN in both
    # the compute copy is torch's round-to-nearest-even cast, except where the low half is exactly 0x8000
    finite = ~nan
    differs = high[finite].view(torch.int16) != w[finite].bfloat16().view(torch.int16)
    assert torch.equal(low[finite][differs], torch.full_like(low[finite][differs], -0x8000))
    assert 0 < int(differs.sum()) < 20  # ties: ~1 in 2^17 random patterns, plus the one edge case above
    # shapes (a 0-d tensor, a matrix, a transposed one) keep theirs; both halves come out contiguous,
    # as the kernel indexes them (a transposed input once gave a transposed high half)
    for x in (torch.randn(()), torch.randn(3, 5), torch.randn(6, 4).t()):
        h, lo = split_master(x)
        assert h.shape == lo.shape == x.shape and h.is_contiguous() and lo.is_contiguous()
        assert torch.equal(join_master(h, lo), x)


@pytest.mark.parametrize("moments", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", [adamw_master_step, adamw_reference], ids=["kernel", "torch_ops"])
def test_the_step_on_halves_is_the_fp32_master_step_to_the_bit(fn, moments):
    """Four steps with decay and a clip factor, the Triton kernel (interpreter) and the torch ops: the
    joined halves, the moments and the compute copy equal those of the same function on fp32 masters."""
    g = torch.Generator().manual_seed(1)
    n = 2000
    w0 = torch.randn(n, generator=g)
    full = {"master": w0.clone(), "param": w0.bfloat16(), "m": torch.zeros(n, dtype=moments)}
    full["v"] = full["m"].clone()
    high, low = split_master(w0)
    halves = {"master": low, "param": high, "m": full["m"].clone(), "v": full["v"].clone()}
    for step in range(1, 5):
        grad = torch.randn(n, generator=g).bfloat16()
        for state in (full, halves):
            fn(
                state["master"],
                state["param"],
                grad,
                state["m"],
                state["v"],
                torch.tensor(0.5),
                step,
                1e-2,
                0.9,
                0.95,
                1e-8,
                0.1,
            )
    assert torch.equal(
        join_master(halves["param"], halves["master"]).view(torch.int32), full["master"].view(torch.int32)
    )
    assert torch.equal(halves["m"], full["m"]) and torch.equal(halves["v"], full["v"])
    assert torch.equal(halves["param"], split_master(full["master"])[0])
    assert (halves["param"] != full["param"]).sum() <= 1  # the RNE copy, but at a tie (rare at n=2000)


def _model():
    torch.manual_seed(0)
    return Transformer(
        ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=32, num_experts=4, top_k=2, max_seq_len=16, qk_norm=True)
    )


def _optimizer(model, remainders: bool) -> MasterWeightAdamW:
    return MasterWeightAdamW(
        optimizer_groups(model, 0.1), bf16_compute_params(model), lr=3e-3, betas=(0.9, 0.95), remainders=remainders
    )


def test_training_on_halves_follows_fp32_masters_and_holds_two_bytes_less():
    a, b = _model(), _model()
    opt_a, opt_b = _optimizer(a, False), _optimizer(b, True)
    state_bytes = {
        name: sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if "master" in k)
        for name, opt in (("a", opt_a), ("b", opt_b))
    }
    assert state_bytes["b"] * 2 == state_bytes["a"] > 0  # int16 low halves against fp32 masters
    assert all(s["master_low"].dtype == torch.int16 for s in opt_b.state.values() if "master_low" in s)
    assert [p.dtype for p in a.parameters()] == [p.dtype for p in b.parameters()]
    gen = torch.Generator().manual_seed(1)
    losses = {"a": [], "b": []}
    for _ in range(5):
        x = torch.randint(0, 256, (4, 16), generator=gen)
        for name, model, opt in (("a", a, opt_a), ("b", b, opt_b)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), x.roll(-1, 1).flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
    # the compute copies differ only at ties (about 1 weight in 131,072 a step; this model starts with
    # one, in w3), which nudges the gradients a little and AdamW's early, sign-like steps pass that on:
    # the weights stay within 3% of one step (lr 3e-3) of each other, the losses within 1e-4
    assert losses["a"][0] == losses["b"][0] and losses["b"] == pytest.approx(losses["a"], rel=1e-4)
    with opt_a.masters_in_model(), opt_b.masters_in_model():
        for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert pb.dtype == pa.dtype == torch.float32, name
            torch.testing.assert_close(pb, pa, rtol=0, atol=1e-4, msg=name)
    assert [p.dtype for p in a.parameters()] == [p.dtype for p in b.parameters()]  # and bf16 again after


def test_a_load_inside_masters_in_model_sets_both_halves():
    """What a checkpoint load does: fp32 weights written into the model while the halves are joined
    come back as the bf16 weight and the low half; the saved optimizer state holds no halves."""
    model = _model()
    opt = _optimizer(model, True)
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in opt.state_dict()["state"].values())
    target = {n: torch.randn_like(p, dtype=torch.float32) for n, p in model.named_parameters()}
    sd = opt.state_dict()
    with opt.masters_in_model():
        opt.load_state_dict(sd)  # replaces the state dicts; the halves must survive it
        for n, p in model.named_parameters():
            p.copy_(target[n])
    with opt.masters_in_model():
        for n, p in model.named_parameters():
            assert torch.equal(p, target[n]), n
    w1 = dict(model.named_parameters())["blocks.0.ffn.experts.w1_EDF"]
    assert w1.dtype == torch.bfloat16 and torch.equal(w1, split_master(target["blocks.0.ffn.experts.w1_EDF"])[0])


def test_a_run_on_halves_resumes_bit_identically_and_from_a_full_master_checkpoint(tmp_path, caplog):
    from helpers.config import MASTER_WEIGHTS_RUN, compose_cfg
    from moeflow.launch.train import train

    common = MASTER_WEIGHTS_RUN
    halves = [*common, "optim.master_remainders=true"]
    whole = train(compose_cfg(*halves, "trainer.steps=3"), tmp_path / "whole")
    train(compose_cfg(*halves, "trainer.steps=1"), tmp_path / "split")
    resumed = train(
        compose_cfg(*halves, "trainer.steps=3", "resume=auto", run_dir=tmp_path / "split"), tmp_path / "split"
    )
    assert resumed["start_step"] == 1 and resumed["train_loss"] == whole["train_loss"]
    # a checkpoint written with full fp32 masters resumes on halves (the same fp32 bits), and says so
    train(compose_cfg(*common, "trainer.steps=1"), tmp_path / "switch")
    switched = train(
        compose_cfg(*halves, "trainer.steps=3", "resume=auto", run_dir=tmp_path / "switch"), tmp_path / "switch"
    )
    assert switched["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-4)
    assert "kept optim.master_remainders=False" in caplog.text
    # and back: a checkpoint written on halves resumes with full masters
    train(compose_cfg(*halves, "trainer.steps=1"), tmp_path / "back")
    back = train(compose_cfg(*common, "trainer.steps=3", "resume=auto", run_dir=tmp_path / "back"), tmp_path / "back")
    assert back["start_step"] == 1 and back["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-4)
    assert "kept optim.master_remainders=True" in caplog.text


def test_halves_without_master_weights_are_refused_and_the_memory_check_counts_them():
    from helpers.config import TINY, compose_cfg
    from moeflow.launch.config import validate
    from moeflow.moe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"optim.master_remainders=true .* needs optim.master_weights=true"):
        validate(compose_cfg(*TINY, "optim.master_remainders=true", "trainer.precision=bf16"))
    both = {"master_weights": True, "master_remainders": True}
    assert train_state_bytes({**both, "moments_dtype": "bfloat16"}) == 10  # bf16 weight, low half, bf16 grad, moments
    assert train_state_bytes({"master_weights": True, "moments_dtype": "bfloat16"}) == 12
    assert train_state_bytes({**both}) == 14
