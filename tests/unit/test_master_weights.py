"""optim.master_weights: AdamW on fp32 weights that writes the model's bf16 copy (kernels/adamw.py,
launch/optim.py), against torch's own AdamW and autocast on the same model."""

from __future__ import annotations

import copy

import pytest
import torch

from moeflow.kernels.adamw import adamw_master_step, adamw_reference
from moeflow.launch.optim import MasterWeightAdamW, bf16_compute_params, optimizer_groups
from moeflow.moe.config import ModelConfig
from moeflow.moe.model import Transformer


def test_the_kernel_is_torch_adamw_in_fp32_and_writes_the_rounded_copy():
    """Three steps with weight decay and a clip factor: the Triton kernel (interpreter), the torch-ops
    reference and torch.optim.AdamW on the fp32 weights with the bf16 gradients upcast."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(300, generator=g)
    ref_w = w0.clone().requires_grad_(True)
    opt = torch.optim.AdamW([ref_w], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    kern = {"master": w0.clone(), "param": w0.bfloat16(), "m": torch.zeros(300), "v": torch.zeros(300)}
    ops = copy.deepcopy(kern)
    for step in range(1, 4):
        grad = torch.randn(300, generator=g).bfloat16()
        coef = torch.tensor(0.5)  # a clip factor: the gradient counts half
        ref_w.grad = grad.float() * coef
        opt.step()
        for state, fn in ((kern, adamw_master_step), (ops, adamw_reference)):
            fn(state["master"], state["param"], grad, state["m"], state["v"], coef, step, 1e-2, 0.9, 0.95, 1e-8, 0.1)
    for state in (kern, ops):
        torch.testing.assert_close(state["master"], ref_w.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(state["param"], state["master"].bfloat16())  # the compute copy is the rounded weight
        torch.testing.assert_close(state["m"], opt.state[ref_w]["exp_avg"], rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(state["v"], opt.state[ref_w]["exp_avg_sq"], rtol=1e-6, atol=1e-10)


def _model():
    torch.manual_seed(0)
    return Transformer(
        ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=32, num_experts=4, top_k=2, max_seq_len=16, qk_norm=True)
    )


def test_training_with_master_weights_follows_autocast_and_torch_adamw():
    """CPU autocast (bf16): the same model trained 5 steps both ways. The forward is the same (autocast
    rounds the same fp32 weights), the gradients too (bf16 out of the same matmuls), so the losses
    agree to fp32 rounding of the update."""
    a, b = _model(), None
    b = copy.deepcopy(a)
    opt_a = torch.optim.AdamW(optimizer_groups(a, 0.1), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    opt_b = MasterWeightAdamW(optimizer_groups(b, 0.1), bf16_compute_params(b), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    lowered = {n for n, p in b.named_parameters() if p.dtype == torch.bfloat16}
    assert (
        "blocks.0.ffn.experts.w1_EDF" in lowered
        and "blocks.0.attn.qkv.weight" in lowered
        and "lm_head.weight" in lowered
    )
    assert not any(k in lowered for k in ("embed.weight", "norm.weight", "blocks.0.attn.q_norm.weight"))
    gen = torch.Generator().manual_seed(1)
    losses = {"a": [], "b": []}
    for _ in range(5):
        x = torch.randint(0, 256, (4, 16), generator=gen)
        for name, model, opt in (("a", a, opt_a), ("b", b, opt_b)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = (
                    torch.nn.functional.cross_entropy(model(x).float().flatten(0, 1), x.roll(-1, 1).flatten())
                    + model.aux_loss()
                )
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
    assert losses["a"][0] == losses["b"][0]  # step 0: the very same computation
    assert losses["b"] == pytest.approx(losses["a"], rel=2e-3)
    with opt_b.masters_in_model():  # the fp32 weights, as a checkpoint sees them
        for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert pb.dtype == torch.float32
            torch.testing.assert_close(pb, pa, rtol=2e-2, atol=2e-3, msg=name)
    assert {n for n, p in b.named_parameters() if p.dtype == torch.bfloat16} == lowered  # and back to bf16 after


def test_its_state_dict_is_torch_adamw_s_and_a_load_keeps_the_fp32_weights():
    model = _model()
    opt = MasterWeightAdamW(optimizer_groups(model, 0.1), bf16_compute_params(model), lr=1e-3)
    sd = opt.state_dict()
    assert all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in sd["state"].values())
    with opt.masters_in_model():
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.load_state_dict(sd)
    with opt.masters_in_model():
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_checkpoint_round_trip_restores_weights_moments_and_copies():
    """Saved through torch.distributed.checkpoint's state dicts (as the trainer saves) and loaded into a
    fresh model: the same fp32 weights, moments and bf16 copies (a load once left the optimizer holding
    the bf16 copy as its 'master')."""
    from moeflow.parallel.checkpoint import apply_model_and_optimizer_state, model_and_optimizer_state

    def fresh():
        model = _model()
        return model, MasterWeightAdamW(
            optimizer_groups(model, 0.1), bf16_compute_params(model), lr=3e-3, betas=(0.9, 0.95)
        )

    a, opt_a = fresh()
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a(x).float().square().mean().backward()
    opt_a.step()
    with opt_a.masters_in_model():  # as the torch engine saves
        saved = copy.deepcopy(model_and_optimizer_state(a, opt_a))
    b, opt_b = fresh()
    with opt_b.masters_in_model():
        template = model_and_optimizer_state(b, opt_b)

    def fill(dst, src):
        for k, v in src.items():
            if isinstance(v, dict):
                fill(dst[k], v)
            elif isinstance(v, torch.Tensor):
                dst[k].copy_(v)

    fill(template, saved)  # what load_sharded does, in place
    with opt_b.masters_in_model():  # as the torch engine loads
        apply_model_and_optimizer_state(b, opt_b, template)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        assert torch.equal(pa, pb) and pa.dtype == pb.dtype, name
        for key in ("exp_avg", "exp_avg_sq", "master"):
            assert (key in sa) == (key in sb) and (
                key not in sa or (torch.equal(sa[key], sb[key]) and sb[key].dtype == torch.float32)
            ), (name, key)


def test_a_run_with_master_weights_resumes_bit_identically(tmp_path):
    from helpers.config import MASTER_WEIGHTS_RUN, compose_cfg
    from moeflow.launch.train import train

    common = MASTER_WEIGHTS_RUN
    whole = train(compose_cfg(*common, "trainer.steps=3"), tmp_path / "whole")
    train(compose_cfg(*common, "trainer.steps=1"), tmp_path / "split")
    resumed = train(
        compose_cfg(*common, "trainer.steps=3", "resume=auto", run_dir=tmp_path / "split"), tmp_path / "split"
    )
    assert resumed["start_step"] == 1 and resumed["train_loss"] == whole["train_loss"]
    plain = train(compose_cfg(*[c for c in common if "master_weights" not in c], "trainer.steps=3"), tmp_path / "plain")
    assert whole["train_loss"] == pytest.approx(
        plain["train_loss"], rel=1e-4
    )  # autocast + torch AdamW on the same model


def test_master_weights_are_refused_where_they_cannot_work():
    from helpers.config import TINY, compose_cfg
    from moeflow.launch.config import validate
    from moeflow.moe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"optim.master_weights=true needs bf16"):
        validate(compose_cfg(*TINY, "optim.master_weights=true", "trainer.device=cpu"))
    with pytest.raises(ConfigError, match=r"needs trainer.grad_accum=1"):
        validate(compose_cfg(*TINY, "optim.master_weights=true", "trainer.precision=bf16", "trainer.grad_accum=2"))


def test_a_weights_only_start_sets_the_fp32_weights(tmp_path):
    """An upcycled model (a weights-only checkpoint) trained with master weights: the fp32 weights are the
    checkpoint's, not the fresh init's (a load into the bf16 copies alone would leave them stale)."""
    pytest.importorskip("transformers")
    import numpy as np

    from helpers.config import compose_cfg
    from helpers.upcycle import make_hf
    from moeflow.launch.train import train
    from moeflow.launch.upcycle import cli as upcycle_cli

    make_hf("llama", tmp_path / "dense", vocab=128)
    np.random.default_rng(0).integers(0, 128, size=4000).astype(np.uint16).tofile(tmp_path / "tokens.bin")
    upcycle_cli.upcycle(
        [str(tmp_path / "dense"), str(tmp_path / "moe"), "--format", "moeflow", "--num-experts", "4", "--top-k", "2"]
    )
    base = [
        f"resume={tmp_path / 'moe'}",
        "data=memmap",
        f"data.path={tmp_path / 'tokens.bin'}",
        "data.seq_len=16",
        "data.batch_size=4",
        "trainer.steps=3",
        "trainer.eval_every=0",
        "trainer.ckpt_every=0",
        "trainer.device=cpu",
        "trainer.precision=bf16",
        "experts.impl=torch",
    ]
    plain = train(compose_cfg(*base), tmp_path / "plain")
    master = train(compose_cfg(*base, "optim.master_weights=true"), tmp_path / "master")
    assert master["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-3)
