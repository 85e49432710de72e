"""AdamW on fp32 master weights that also writes the bf16 compute copy, in one pass.

With autocast, every step casts each fp32 weight to bf16 in the forward (read 4 B, write 2 B per
parameter) and each bf16 weight gradient back to fp32 (read 2 B, write 4 B), beside AdamW's own
traffic (read weight, gradient and both moments, write weight and moments: 28 B). Keeping the
model's matrices in bf16 and the fp32 weights here, one kernel per tensor reads the bf16 gradient
(2 B), the master and moments (12 B) and writes them (12 B) plus the bf16 copy (2 B): 28 B per
parameter instead of 40.

The update is torch's AdamW (decoupled weight decay, bias correction) in fp32, with the gradient
multiplied by `1 / grad_scale` as it is read (the clip factor, a device scalar: no host read).
`adamw_reference` is the same math in torch ops: the CPU path, and the tests' reference.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .autotune import INTERPRET

BLOCK = 1024 if not INTERPRET else 128
KERNEL = os.environ.get("MOEFLOW_ADAMW_KERNEL", "1") != "0"  # 0: the torch-ops reference on the GPU too (A/B)


@triton.jit
def _round_to_bf16_bits(w):
    """fp32 -> the bits of the nearest bf16 (ties to even), as autocast's cast rounds; spelled out so
    that Triton's CPU interpreter (which truncates) rounds the same as the GPU."""
    bits = w.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(w != w, (bits >> 16) | 0x40, rounded).to(tl.uint16)  # a NaN stays a NaN


@triton.jit
def _adamw_master_kernel(
    master_ptr,
    param_ptr,
    grad_ptr,
    m_ptr,
    v_ptr,
    inv_scale_ptr,
    n,
    lr,
    beta1,
    beta2,
    eps,
    decay,
    bias_c1,
    sqrt_bias_c2,
    WRITE_COPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(inv_scale_ptr)
    w = tl.load(master_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = w * (1.0 - lr * decay)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    denom = tl.sqrt(v) / sqrt_bias_c2 + eps
    w = w - (lr / bias_c1) * (m / denom)
    tl.store(master_ptr + offs, w, mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    if WRITE_COPY:  # param_ptr: the bf16 copy, seen as uint16
        tl.store(param_ptr + offs, _round_to_bf16_bits(w), mask=mask)


def _coefficients(step: int, lr: float, beta1: float, beta2: float) -> tuple[float, float]:
    return 1.0 - beta1**step, (1.0 - beta2**step) ** 0.5


@torch.no_grad()
def adamw_reference(
    master, param, grad, m, v, inv_scale, step: int, lr: float, beta1: float, beta2: float, eps: float, decay: float
) -> None:
    """The update in torch ops (fp32 math), in place: master, moments, and the compute copy `param`."""
    bias_c1, sqrt_bias_c2 = _coefficients(step, lr, beta1, beta2)
    g = grad.float() * inv_scale
    master.mul_(1.0 - lr * decay)
    m32 = m.float().mul_(beta1).add_(g, alpha=1.0 - beta1)
    v32 = v.float().mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    master.addcdiv_(m32, v32.sqrt().div_(sqrt_bias_c2).add_(eps), value=-lr / bias_c1)
    m.copy_(m32)
    v.copy_(v32)
    param.copy_(master)


@torch.no_grad()
def adamw_master_step(
    master, param, grad, m, v, inv_scale, step: int, lr: float, beta1: float, beta2: float, eps: float, decay: float
) -> None:
    """One AdamW step of one tensor (contiguous, same number of elements); Triton on CUDA (and under
    the CPU interpreter), the torch reference elsewhere."""
    if not KERNEL or not (master.is_cuda or INTERPRET):
        return adamw_reference(master, param, grad, m, v, inv_scale, step, lr, beta1, beta2, eps, decay)
    n = master.numel()
    bias_c1, sqrt_bias_c2 = _coefficients(step, lr, beta1, beta2)
    copy = param.data_ptr() != master.data_ptr()
    if copy and param.dtype != torch.bfloat16:
        raise TypeError(f"the compute copy must be bf16, got {param.dtype}")  # a caller's bug, not the user's
    _adamw_master_kernel[(triton.cdiv(n, BLOCK),)](
        master,
        param.view(torch.uint16) if copy else master,
        grad,
        m,
        v,
        inv_scale,
        n,
        lr,
        beta1,
        beta2,
        eps,
        decay,
        bias_c1,
        sqrt_bias_c2,
        WRITE_COPY=copy,
        BLOCK=BLOCK,
        num_warps=4,
    )
