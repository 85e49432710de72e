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

Moments may be stored in bf16 (`optim.moments_dtype`): 4 B less read and 4 B less written per
parameter, and half their memory. They are rounded stochastically (Megatron-Core's and
torchao's bf16 optimizers do the same): rounded to nearest, beta2 * v with beta2 > 1 - 2^-9
(0.999, torch's default) rounds back to v itself, so the second moment could never decay. The
random bits come from the step and the tensor's index (`seed`), so a resumed run draws the same.

The fp32 master may be kept as its low 16 bits only (`optim.master_remainders`, Megatron-Core's and
Transformer Engine's `store_param_remainders`): the model's bf16 weight holds the high 16, rounded
half away from zero rather than to even (they differ only where the low half is exactly 0x8000), and
the two together are the fp32 bits exactly. The step reads and writes 2 B per parameter less (18 B
with bf16 moments instead of 20), and the state is 2 B per parameter smaller.
"""

from __future__ import annotations

import os
import sys

import torch
import triton
import triton.language as tl

from .autotune import INTERPRET

BLOCK = 1024 if not INTERPRET else 128
NUM_WARPS = 4
assert sys.byteorder == "little", "split_master/join_master read an fp32's halves in little-endian order"
KERNEL = os.environ.get("MOEFLOW_ADAMW_KERNEL", "1") != "0"  # 0: the torch-ops reference on the GPU too (A/B)


@triton.jit
def _round_to_bf16_bits(w):
    """fp32 -> the bits of the nearest bf16 (ties to even), as autocast's cast rounds; spelled out so
    that Triton's CPU interpreter (which truncates) rounds the same as the GPU."""
    bits = w.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(w != w, (bits >> 16) | 0x40, rounded).to(tl.uint16)  # a NaN stays a NaN


@triton.jit
def _stochastic_bf16_bits(x, noise):
    """fp32 -> bf16 bits rounded up with probability equal to the discarded fraction: unbiased, so
    small updates survive on average. Adding 16 random low bits (`noise`) to the magnitude carries
    into the kept bits exactly that often."""
    bits = x.to(tl.uint32, bitcast=True)
    return tl.where(x != x, (bits >> 16) | 0x40, (bits + noise) >> 16).to(tl.uint16)


@triton.jit
def _split_master(w):
    """fp32 -> (the bf16 compute weight's bits, the low 16 bits): the high half rounded up in magnitude
    where the low half is >= 0x8000, so that `_join_master` can undo it. A NaN stays a NaN in bf16."""
    bits = w.to(tl.uint32, bitcast=True)
    low = bits & 0xFFFF
    high = (bits >> 16) + (low >> 15)  # +1 where the low half's top bit is set
    high = tl.where(w != w, (bits >> 16) | 0x40, high)
    return high.to(tl.uint16), low.to(tl.uint16)


@triton.jit
def _join_master(high, low):
    """`_split_master`'s inverse: the fp32 bits, exactly (uint32 wraps as the split's carry did)."""
    low32 = low.to(tl.uint32)
    bits = ((high.to(tl.uint32) - (low32 >> 15)) << 16) | low32
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_moment(ptr, offs, mask, BF16: tl.constexpr):
    # one return after an if/else: Triton's compiler types a return after a constexpr `if ...: return`
    # too, and refuses bf16 bits (uint16) beside fp32 (the CPU interpreter does not check)
    if BF16:  # bf16 bits (seen as uint16) -> fp32, exactly
        x = (tl.load(ptr + offs, mask=mask, other=0).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    return x


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
    seed,
    WRITE_COPY: tl.constexpr,
    MOMENTS_BF16: tl.constexpr,
    REMAINDERS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(inv_scale_ptr)
    if REMAINDERS:  # master_ptr: the low 16 bits, param_ptr: the high 16 (both seen as uint16)
        w = _join_master(tl.load(param_ptr + offs, mask=mask, other=0), tl.load(master_ptr + offs, mask=mask, other=0))
    else:
        w = tl.load(master_ptr + offs, mask=mask, other=0.0)
    m = _load_moment(m_ptr, offs, mask, MOMENTS_BF16)
    v = _load_moment(v_ptr, offs, mask, MOMENTS_BF16)
    w = w * (1.0 - lr * decay)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    denom = tl.sqrt(v) / sqrt_bias_c2 + eps
    w = w - (lr / bias_c1) * (m / denom)
    if REMAINDERS:
        high, low = _split_master(w)
        tl.store(param_ptr + offs, high, mask=mask)
        tl.store(master_ptr + offs, low, mask=mask)
    else:
        tl.store(master_ptr + offs, w, mask=mask)
    if MOMENTS_BF16:  # one Philox draw per element, its two 16-bit halves for the two moments: Philox is
        # ~20 integer multiplies a draw, and two draws made the step compute-bound (H100: no faster than fp32)
        bits = tl.randint(seed, offs).to(tl.uint32, bitcast=True)
        tl.store(m_ptr + offs, _stochastic_bf16_bits(m, bits & 0xFFFF), mask=mask)
        tl.store(v_ptr + offs, _stochastic_bf16_bits(v, bits >> 16), mask=mask)
    else:
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
    if WRITE_COPY and not REMAINDERS:  # param_ptr: the bf16 copy, seen as uint16
        tl.store(param_ptr + offs, _round_to_bf16_bits(w), mask=mask)


def _coefficients(step: int, lr: float, beta1: float, beta2: float) -> tuple[float, float]:
    return 1.0 - beta1**step, (1.0 - beta2**step) ** 0.5


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`_stochastic_bf16_bits` in torch ops (other random bits than Triton's Philox, same law)."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, generator=generator, device=x.device)
    rounded = (((bits + noise) >> 16) << 16).view(torch.float32).bfloat16()  # low bits zero: the cast is exact
    return torch.where(x.isnan(), x.bfloat16(), rounded)


def _halves(w: torch.Tensor) -> torch.Tensor:
    """An fp32 tensor's bits as int16 pairs [..., (low, high)] (little-endian: the low half first)."""
    return w.contiguous().view(torch.int16).unflatten(-1, (-1, 2)) if w.dim() else _halves(w.reshape(1))[0]


def split_master(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`_split_master` in torch ops: fp32 -> (bf16 compute weight, int16 low bits), both contiguous.
    int16 arithmetic wraps (0x7FFF + 1 is -0x8000), as the kernel's uint32 carry does."""
    halves = _halves(w.float())
    low = halves[..., 0].clone()
    high = halves[..., 1] + (low < 0).to(torch.int16)  # rounded up in magnitude where the low half is >= 0x8000
    nan = w.isnan()
    if nan.any():
        high = torch.where(nan, halves[..., 1] | 0x40, high)
    return high.contiguous().view(torch.bfloat16), low


def join_master(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """`_join_master` in torch ops: the fp32 weight from its two halves, bit for bit (a NaN stays a
    NaN, not always with its payload)."""
    top = high.contiguous().view(torch.int16) - (low < 0).to(torch.int16)
    return torch.stack((low.reshape(-1), top.reshape(-1)), dim=-1).view(torch.float32).reshape(high.shape)


def _store_moment(dst: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None) -> None:
    dst.copy_(stochastic_round_bf16(value, generator) if generator is not None else value)


@torch.no_grad()
def adamw_reference(
    master,
    param,
    grad,
    m,
    v,
    inv_scale,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    decay: float,
    seed: int = 0,
) -> None:
    """The update in torch ops (fp32 math), in place: master, moments (bf16 ones rounded
    stochastically, drawn from `seed`), and the compute copy `param`. An int16 `master` is the fp32
    weight's low half, `param` its high half (`split_master`)."""
    if master.dtype == torch.int16:
        full = join_master(param, master)
        adamw_reference(full, param, grad, m, v, inv_scale, step, lr, beta1, beta2, eps, decay, seed)
        high, low = split_master(full)
        param.copy_(high)
        master.copy_(low)
        return
    bias_c1, sqrt_bias_c2 = _coefficients(step, lr, beta1, beta2)
    g = grad.float() * inv_scale
    master.mul_(1.0 - lr * decay)
    m32 = m.float().mul_(beta1).add_(g, alpha=1.0 - beta1)
    v32 = v.float().mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    master.addcdiv_(m32, v32.sqrt().div_(sqrt_bias_c2).add_(eps), value=-lr / bias_c1)
    generator = torch.Generator(m.device).manual_seed(seed) if m.dtype == torch.bfloat16 else None
    _store_moment(m, m32, generator)
    _store_moment(v, v32, generator)
    param.copy_(master)


@torch.no_grad()
def adamw_master_step(
    master,
    param,
    grad,
    m,
    v,
    inv_scale,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    decay: float,
    seed: int = 0,
) -> None:
    """One AdamW step of one tensor (contiguous, same number of elements; moments both fp32 or both
    bf16; `master` fp32, or int16 for its low half with `param` the high half); Triton on CUDA (and
    under the CPU interpreter), the torch reference elsewhere."""
    if m.dtype != v.dtype or m.dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"moments must both be float32 or bfloat16, got {m.dtype} and {v.dtype}")  # a caller's bug
    remainders = master.dtype == torch.int16
    if remainders and param.dtype != torch.bfloat16:
        raise TypeError(f"the high half must be bf16, got {param.dtype}")  # a caller's bug, not the user's
    if not KERNEL or not (master.is_cuda or INTERPRET):
        return adamw_reference(master, param, grad, m, v, inv_scale, step, lr, beta1, beta2, eps, decay, seed)
    copy = param.data_ptr() != master.data_ptr()
    if copy and param.dtype != torch.bfloat16:
        raise TypeError(f"the compute copy must be bf16, got {param.dtype}")  # a caller's bug, not the user's
    n = master.numel()
    bias_c1, sqrt_bias_c2 = _coefficients(step, lr, beta1, beta2)
    bf16_moments = m.dtype == torch.bfloat16
    _adamw_master_kernel[(triton.cdiv(n, BLOCK),)](
        master.view(torch.uint16) if remainders else master,
        param.view(torch.uint16) if copy else master,
        grad,
        *((m.view(torch.uint16), v.view(torch.uint16)) if bf16_moments else (m, v)),
        inv_scale,
        n,
        lr,
        beta1,
        beta2,
        eps,
        decay,
        bias_c1,
        sqrt_bias_c2,
        seed,
        WRITE_COPY=copy,
        MOMENTS_BF16=bf16_moments,
        REMAINDERS=remainders,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
