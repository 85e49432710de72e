"""Gradient clipping: the global norm against torch's own (float64 reference), and the clip factor
folded into fused AdamW's step (`grad_scale`) against clipping the gradients first."""

from __future__ import annotations

import copy

import pytest
import torch

from moeflow.parallel.clip import clear_folded_clip, clip_grad_norm_, folds_clip_into_step, global_grad_norm


def random_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.GELU(), torch.nn.Linear(31, 7), torch.nn.LayerNorm(7))
    model(torch.randn(5, 13)).square().sum().mul(50.0).backward()  # large gradients: the clip is active
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_norm_equals_a_float64_reference(seed):
    model = random_model(seed)
    grads = [p.grad for p in model.parameters()]
    want = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    assert global_grad_norm(grads).item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("max_norm", [0.5, float("inf")])
def test_the_clip_folded_into_fused_adamw_equals_clipping_first(seed, max_norm):
    """grad_scale = 1/coef in the fused step updates the weights as clip-then-step does (rounding apart)."""
    a = random_model(seed)
    b = copy.deepcopy(a)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, fused=True)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, fused=True)
    assert folds_clip_into_step(opt_b) and not folds_clip_into_step(torch.optim.AdamW(a.parameters()))
    for step in range(3):
        for m in (a, b):
            m.zero_grad(set_to_none=True)
            m(torch.randn(5, 13, generator=torch.Generator().manual_seed(step))).square().sum().mul(50.0).backward()
        norm_a = torch.nn.utils.clip_grad_norm_(a.parameters(), max_norm)  # torch's own clip, then step
        opt_a.step()
        norm_b = clip_grad_norm_(list(b.parameters()), max_norm, optimizer=opt_b)
        assert (getattr(opt_b, "grad_scale", None) is not None) == (max_norm < float("inf"))
        opt_b.step()
        clear_folded_clip(opt_b)
        assert not hasattr(opt_b, "grad_scale")
        assert norm_b.item() == pytest.approx(norm_a.item(), rel=1e-6)
        for pa, pb in zip(a.parameters(), b.parameters()):
            # one step: rounding of grad * coef against grad / (1 / coef), an ulp; later steps through the
            # network and Adam's normalisation amplify that, still 500x under one update (lr 1e-2)
            torch.testing.assert_close(pb, pa, rtol=0, atol=3e-7 if step == 0 else 2e-5)


def test_without_a_fused_optimizer_the_gradients_are_clipped_in_place():
    model = random_model(0)
    before = [p.grad.clone() for p in model.parameters()]
    norm = clip_grad_norm_(list(model.parameters()), 0.25, optimizer=torch.optim.AdamW(model.parameters()))
    coef = 0.25 / (norm + 1e-6)
    for g0, p in zip(before, model.parameters()):
        torch.testing.assert_close(p.grad, g0 * coef)
