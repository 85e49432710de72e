"""The weighted combine as one gather-sum per token: y_T[t] = sum_a w[a] * y_A[a] over token t's rows.

`moeflow.moe.routing.combine` computes this with torch ops as a weight multiply (a copy of all
A rows) and an `index_add` (atomic adds into the token rows); with the routed rows coming back
from an expert-parallel exchange in expert order, those were 3.6 ms of a 21 ms EP step on an
H200 (bench/RESULTS.md). Here each token's program reads its rows by position and sums them in
fp32, in a fixed order (deterministic, no atomics); the backward writes each row's gradient
w[a] * g_T[t] once and the weight's gradient <g_T[t], y_A[a]> beside it.

Bytes (A rows of D, T tokens, b bytes per element): forward reads A*D*b and writes T*D*b; the
backward reads A*D*b (y_A, for the weight gradient) and T*D*b, and writes A*D*b.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import INTERPRET


@triton.jit
def _gather_sum_kernel(src_ptr, row_ptr, w_ptr, offs_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
    """out[t] = sum over i in [offs[t], offs[t+1]) of w[row[i]] * src[row[i]] (fp32 accumulate)."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    start = tl.load(offs_ptr + t)
    end = tl.load(offs_ptr + t + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(start, end):
        row = tl.load(row_ptr + i).to(tl.int64)
        w = tl.load(w_ptr + row).to(tl.float32)
        acc += w * tl.load(src_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * D + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gather_sum_bwd_kernel(g_ptr, src_ptr, row_ptr, w_ptr, offs_ptr, gsrc_ptr, gw_ptr, D, BLOCK_D: tl.constexpr):
    """For token t's rows: gsrc[row] = w[row] * g[t] and gw[row] = <g[t], src[row]> (fp32)."""
    t = tl.program_id(0)
    start = tl.load(offs_ptr + t)
    end = tl.load(offs_ptr + t + 1)
    g_row = g_ptr + t.to(tl.int64) * D
    for i in range(start, end):
        row = tl.load(row_ptr + i).to(tl.int64)
        w = tl.load(w_ptr + row).to(tl.float32)
        dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = cols < D
            g = tl.load(g_row + cols, mask=mask, other=0.0).to(tl.float32)
            s = tl.load(src_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(gsrc_ptr + row * D + cols, (w * g).to(gsrc_ptr.dtype.element_ty), mask=mask)
            dot += g * s
        tl.store(gw_ptr + row, tl.sum(dot, 0))


def _block(D: int, cap: int) -> int:
    return 16 if INTERPRET else min(cap, triton.next_power_of_2(D))


class _GatherSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_AD, weight_A, rows_P, offsets_T, num_tokens: int):
        y_AD = y_AD.contiguous()
        D = y_AD.shape[1]
        out = y_AD.new_empty(num_tokens, D)
        if num_tokens and D:
            block = _block(D, 1024)
            _gather_sum_kernel[(num_tokens, triton.cdiv(D, block))](
                y_AD, rows_P, weight_A, offsets_T, out, D, BLOCK_D=block, num_warps=4
            )
        ctx.save_for_backward(y_AD, weight_A, rows_P, offsets_T)
        return out

    @staticmethod
    def backward(ctx, g_TD):
        y_AD, weight_A, rows_P, offsets_T = ctx.saved_tensors
        g_TD = g_TD.contiguous()
        # rows no token reads (none from dispatch.combine: every row belongs to a token) get zeros
        g_AD = torch.zeros_like(y_AD) if rows_P.shape[0] < y_AD.shape[0] else torch.empty_like(y_AD)
        g_w = torch.zeros(weight_A.shape, dtype=torch.float32, device=weight_A.device)
        T, D = g_TD.shape
        if T and D:
            _gather_sum_bwd_kernel[(T,)](
                g_TD, y_AD, rows_P, weight_A, offsets_T, g_AD, g_w, D, BLOCK_D=_block(D, 2048), num_warps=8
            )
        return g_AD, g_w.to(weight_A.dtype), None, None, None


def gather_sum(y_AD: torch.Tensor, weight_A: torch.Tensor, token_A: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """y_T[t] = sum of weight_A[a] * y_AD[a] over the rows a with token_A[a] == t (0 for tokens with none);
    differentiable in y_AD and weight_A."""
    rows_P = torch.argsort(token_A, stable=True)  # rows grouped by token, in row order within a token
    counts_T = torch.zeros(num_tokens, dtype=torch.int64, device=token_A.device).scatter_add_(
        0, token_A, torch.ones_like(token_A)
    )
    offsets_T = torch.zeros(num_tokens + 1, dtype=torch.int64, device=token_A.device)
    torch.cumsum(counts_T, 0, out=offsets_T[1:])
    return _GatherSum.apply(y_AD, weight_A.contiguous(), rows_P, offsets_T, num_tokens)
