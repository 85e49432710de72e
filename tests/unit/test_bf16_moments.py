"""optim.moments_dtype=bfloat16: AdamW's moments stored in bf16, rounded stochastically
(kernels/adamw.py, launch/optim.py), against the fp32 update on the same inputs."""

from __future__ import annotations

import pytest
import torch

from moeflow.kernels.adamw import adamw_master_step, adamw_reference, stochastic_round_bf16

STEPS = (adamw_master_step, adamw_reference)  # the Triton kernel (CPU interpreter) and the torch-ops path


def _neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and just above each fp32 value (equal when it is one)."""
    down = x.bfloat16().float()
    step = torch.nextafter(x.bfloat16(), torch.full_like(x, float("inf")).bfloat16()).float()
    back = torch.nextafter(x.bfloat16(), torch.full_like(x, float("-inf")).bfloat16()).float()
    lo = torch.where(down > x, back, down)
    hi = torch.where(down < x, step, down)
    return lo, hi


@pytest.mark.parametrize("fn", STEPS, ids=["triton", "torch"])
def test_one_step_is_the_fp32_update_with_each_moment_rounded_to_a_neighbour(fn):
    """From the same bf16 state: the fp32 weight is exactly the fp32 path's (the update uses the moments
    before rounding), and each stored moment is one of the two bf16 values around the fp32 moment."""
    g = torch.Generator().manual_seed(0)
    n = 777
    w = torch.randn(n, generator=g)
    m, v = (torch.randn(n, generator=g) * 0.1).bfloat16(), (torch.rand(n, generator=g) * 0.01).bfloat16()
    grad = torch.randn(n, generator=g).bfloat16()
    coef = torch.tensor(0.7)
    fp32 = {"master": w.clone(), "param": w.bfloat16(), "m": m.float(), "v": v.float()}
    adamw_reference(fp32["master"], fp32["param"], grad, fp32["m"], fp32["v"], coef, 5, 1e-2, 0.9, 0.95, 1e-8, 0.1)
    master, param, m16, v16 = w.clone(), w.bfloat16(), m.clone(), v.clone()
    fn(master, param, grad, m16, v16, coef, 5, 1e-2, 0.9, 0.95, 1e-8, 0.1, seed=11)
    torch.testing.assert_close(master, fp32["master"], rtol=1e-6, atol=1e-7)
    assert torch.equal(param, master.bfloat16())
    for got, want in ((m16, fp32["m"]), (v16, fp32["v"])):
        lo, hi = _neighbours(want)
        assert got.dtype == torch.bfloat16 and bool(((got.float() == lo) | (got.float() == hi)).all())
        assert bool((got.float() != want.bfloat16().float()).any())  # not simply rounded to nearest


@pytest.mark.parametrize("fn", STEPS, ids=["triton", "torch"])
def test_the_second_moment_decays_where_rounding_to_nearest_would_freeze_it(fn):
    """beta2=0.999 and a zero gradient: 0.999 * v lies within half a bf16 step of v, so rounding to
    nearest keeps v forever; stochastic rounding gives 0.999 * v on average."""
    n = 8192
    master, param = torch.zeros(n), torch.zeros(n, dtype=torch.bfloat16)
    m, v = torch.zeros(n, dtype=torch.bfloat16), torch.ones(n, dtype=torch.bfloat16)
    assert (torch.ones(1) * 0.999).bfloat16().item() == 1.0
    fn(master, param, torch.zeros(n, dtype=torch.bfloat16), m, v, torch.tensor(1.0), 3, 1e-3, 0.9, 0.999, 1e-8, 0.0)
    # each value is 1 - 2^-8 (w.p. p = 0.256) or 1; mean 0.999, sd of the mean 2^-8 * sqrt(p(1-p)/n)
    sd = 2**-8 * (0.256 * 0.744 / n) ** 0.5
    assert abs(v.float().mean().item() - 0.999) < 5 * sd


@pytest.mark.parametrize("fn", STEPS, ids=["triton", "torch"])
def test_the_draws_follow_the_seed(fn):
    def run(seed):
        n = 4096
        w = torch.linspace(-1, 1, n)
        m, v = torch.zeros(n, dtype=torch.bfloat16), torch.zeros(n, dtype=torch.bfloat16)
        grad = torch.linspace(-0.3, 0.7, n).bfloat16()
        fn(w, w, grad, m, v, torch.tensor(1.0), 1, 1e-3, 0.9, 0.95, 1e-8, 0.0, seed=seed)
        return m, v

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # a resumed run draws the same
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    assert not torch.equal(a[0].view(torch.int16) & 0xFF, a[1].view(torch.int16) & 0xFF)


@pytest.mark.parametrize("fn", STEPS, ids=["triton", "torch"])
def test_the_two_moments_round_independently(fn):
    """Equal fp32 moments (beta1 = beta2, equal start): rounding the same way each time would mean both
    used the same random bits; independent bits round them together only by chance."""
    n = 8192
    master, param = torch.zeros(n), torch.zeros(n, dtype=torch.bfloat16)
    m, v = torch.ones(n, dtype=torch.bfloat16), torch.ones(n, dtype=torch.bfloat16)
    fn(master, param, torch.zeros(n, dtype=torch.bfloat16), m, v, torch.tensor(1.0), 3, 1e-3, 0.999, 0.999, 1e-8, 0.0)
    down_m, down_v = (m.float() < 1).float(), (v.float() < 1).float()
    assert 0.2 < down_m.mean().item() < 0.31 and 0.2 < down_v.mean().item() < 0.31  # P(down) = 0.256 each
    corr = torch.corrcoef(torch.stack([down_m, down_v]))[0, 1].item()
    assert abs(corr) < 5 / n**0.5, corr


def test_stochastic_rounding_is_unbiased_and_keeps_specials():
    x = torch.full((200_000,), 1.0 + 2**-10)  # an eighth of the way from 1 to the next bf16, 1 + 2^-7
    r = stochastic_round_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(r.mean().item() - x[0].item()) < 5 * 2**-7 * (0.125 * 0.875 / x.numel()) ** 0.5
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -2.5])
    out = stochastic_round_bf16(special, torch.Generator().manual_seed(0)).float()
    assert out[0].isnan() and torch.equal(out[1:], special[1:])


def _model():
    from moeflow.moe.config import ModelConfig
    from moeflow.moe.model import Transformer

    torch.manual_seed(0)
    return Transformer(
        ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=32, num_experts=4, top_k=2, max_seq_len=16, qk_norm=True)
    )


def test_training_with_bf16_moments_follows_fp32_moments(monkeypatch):
    """30 steps of a small MoE in fp32, torch AdamW vs moeflow's with bf16 moments: the losses move
    together (differences of bf16 rounding of the moments only), and the state is half the bytes.
    The torch-ops step (the kernel's equal above), as the interpreter would take minutes."""
    import copy

    monkeypatch.setattr("moeflow.kernels.adamw.KERNEL", False)

    from moeflow.launch.optim import MasterWeightAdamW, optimizer_groups

    a = _model()
    b = copy.deepcopy(a)
    opt_a = torch.optim.AdamW(optimizer_groups(a, 0.1), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    opt_b = MasterWeightAdamW(
        optimizer_groups(b, 0.1), [], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, moments_dtype=torch.bfloat16
    )
    batches = torch.randint(0, 256, (3, 4, 16), generator=torch.Generator().manual_seed(1))  # learnable: seen 10 times
    losses = {"a": [], "b": []}
    for step in range(30):
        x = batches[step % 3]
        for name, model, opt in (("a", a, opt_a), ("b", b, opt_b)):
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten()) + model.aux_loss()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[name].append(loss.item())
    assert losses["a"][-1] < losses["a"][0] - 0.5  # it learned something
    assert losses["b"] == pytest.approx(losses["a"], rel=1e-2)
    assert all(s[k].dtype == torch.bfloat16 for s in opt_b.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert all(p.dtype == torch.float32 for p in b.parameters())  # no compute copies without master weights


def _checkpoint(run, step: int) -> dict:
    from moeflow.parallel.checkpoint import read_full_tensors

    return read_full_tensors(run / "checkpoints" / f"step_{step:08d}")


def test_a_run_with_bf16_moments_resumes_bit_identically_and_across_moment_dtypes(tmp_path, monkeypatch, caplog):
    """Whole vs stopped at step 1 and resumed: every tensor of the step-3 checkpoints is equal (the draws
    after the resume are the uninterrupted run's). Across moment dtypes, the moments are loaded (a load
    that dropped them would move the weights by up to the learning rate) and the switch is said."""
    from helpers.config import TINY, compose_cfg
    from moeflow.launch.train import train

    monkeypatch.setattr("moeflow.kernels.adamw.KERNEL", False)  # the torch-ops step: the interpreter is slow
    common = [*TINY, "trainer.eval_every=0", "trainer.keep_checkpoints=0", "trainer.ckpt_every=1"]
    bf16, fp32 = "optim.moments_dtype=bfloat16", "optim.moments_dtype=float32"
    train(compose_cfg(*common, bf16, "trainer.steps=3"), tmp_path / "whole")
    train(compose_cfg(*common, bf16, "trainer.steps=1"), tmp_path / "split")
    train(compose_cfg(*common, bf16, "trainer.steps=3", "resume=auto", run_dir=tmp_path / "split"), tmp_path / "split")
    whole, resumed = _checkpoint(tmp_path / "whole", 3), _checkpoint(tmp_path / "split", 3)
    assert whole.keys() == resumed.keys() and any(
        "exp_avg_sq" in k and v.dtype == torch.bfloat16 for k, v in whole.items()
    )
    assert [k for k in whole if not torch.equal(whole[k], resumed[k])] == []
    for first, then in ((bf16, fp32), (fp32, bf16)):
        run = tmp_path / first.split("=")[1]
        train(compose_cfg(*common, first, "trainer.steps=1"), run)
        caplog.clear()
        train(compose_cfg(*common, then, "trainer.steps=3", "resume=auto", run_dir=run), run)
        assert f"kept {first}; this run uses {then.split('=')[1]}" in caplog.text
        got = _checkpoint(run, 3)
        weights = [k for k in whole if k.startswith("model.")]
        assert max((got[k].float() - whole[k].float()).abs().max().item() for k in weights) < 1e-5


def test_a_load_sets_the_moments_in_their_own_dtype_and_values():
    """load_state_dict of fp32 moments into a bf16-moment optimizer and back: the values are the saved
    ones (cast once), in the optimizer's dtype, each tensor converted on its own."""
    from moeflow.launch.optim import MasterWeightAdamW, optimizer_groups

    model = _model()
    opt = torch.optim.AdamW(optimizer_groups(model, 0.1), lr=1e-3)
    model(torch.randint(0, 256, (2, 16))).float().square().mean().backward()
    opt.step()
    saved = opt.state_dict()
    for dtype in (torch.bfloat16, torch.float32):
        mine = MasterWeightAdamW(optimizer_groups(model, 0.1), [], lr=1e-3, moments_dtype=dtype)
        mine.load_state_dict(saved)
        for i, p in enumerate(q for g in mine.param_groups for q in g["params"]):
            for name in ("exp_avg", "exp_avg_sq"):
                got = mine.state[p][name]
                assert got.dtype == dtype and torch.equal(got, saved["state"][i][name].to(dtype)), (i, name)
            assert int(mine.state[p]["step"]) == 1


def test_bf16_moments_are_refused_where_they_cannot_work_and_counted_by_the_memory_check():
    from helpers.config import TINY, compose_cfg
    from moeflow.launch.config import validate
    from moeflow.launch.optim import train_state_bytes
    from moeflow.moe.errors import ConfigError

    bf16 = "optim.moments_dtype=bfloat16"
    with pytest.raises(ConfigError, match=r"optim.moments_dtype=bfloat16 needs one process"):
        validate(compose_cfg(*TINY, bf16, "launcher=local", "launcher.nproc=2"))
    with pytest.raises(ConfigError, match=r"needs one process and parallel.dispatcher=auto"):  # a one-rank group shards
        validate(compose_cfg(*TINY, bf16, "parallel.dispatcher=capacity"))
    with pytest.raises(ConfigError, match=r"must be one of|float32"):
        validate(compose_cfg(*TINY, "optim.moments_dtype=float16"))
    assert (
        train_state_bytes({"moments_dtype": "float32"}) == 16 and train_state_bytes({"moments_dtype": "bfloat16"}) == 12
    )
    validate(compose_cfg(*TINY, bf16))  # one process on the CPU: fine
