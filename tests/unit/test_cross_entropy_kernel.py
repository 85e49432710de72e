"""kernels/cross_entropy.py (Triton, under the CPU interpreter here) against a float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moeflow.kernels.cross_entropy import cross_entropy_per_token, fused_available


# 37 < the interpreter's block of 64: lanes masked in every block (a GPU's 4096-wide block and a small
# vocabulary gave NaN); 131: a ragged last block; 64: exactly one
@pytest.mark.parametrize(
    "dtype, V", [(torch.float32, 200), (torch.bfloat16, 131), (torch.bfloat16, 64), (torch.float32, 37)]
)
def test_loss_and_gradient_match_float64(dtype, V):
    """Several vocabulary blocks and a ragged last one; large logits (no overflow: online max)."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(9, V, generator=g) * 30).to(dtype).requires_grad_()
    target = torch.randint(0, V, (9,), generator=g)
    weights = torch.rand(9, generator=g)  # a per-token upstream gradient, not just the mean's
    assert fused_available(logits)
    loss = cross_entropy_per_token(logits, target)
    (loss * weights).sum().backward()
    ref_logits = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(ref_logits, target, reduction="none")
    (ref * weights.double()).sum().backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # the gradient is stored in the logits' dtype
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=tol, atol=tol)
