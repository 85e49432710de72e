"""Row-wise top-k indices for router scores: one Triton pass over the (tokens, experts) matrix.

`torch.topk` on a (16384, 128) float matrix with k = 8 takes ~0.12 ms on an H100 (a generic
radix select, then a sort of the k results), longer than everything else in routing but the
router GEMMs. Router rows are short (E <= 1024 experts), so one program holds a block of rows in
registers and takes the maximum k times: one read of the scores, one write of the indices.

Order and ties: indices come out by descending score (as `topk(sorted=True)`); equal scores go
to the lower expert index; NaN counts as larger than every number (as in torch.topk).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_EXPERTS = 1024  # a row of scores lives in one program's registers
# MOEFLOW_TOPK_KERNEL=0 routes through torch.topk on the GPU too (A/B timing)
_KERNEL_ON = os.environ.get("MOEFLOW_TOPK_KERNEL", "1") != "0"


@triton.jit
def _topk_rows_kernel(s_ptr, out_ptr, T, E, stride_t, K, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    mask_t = rows < T
    avail = mask_t[:, None] & (cols < E)[None, :]  # not yet taken (columns past E never are)
    v = tl.load(s_ptr + rows.to(tl.int64)[:, None] * stride_t + cols[None, :], mask=avail, other=0.0).to(tl.float32)
    # an int32 key in the scores' order, NaN (of either sign) above +inf as torch.topk ranks it, -0 equal to +0
    v = tl.where(v != v, float("nan"), v + 0.0)
    bits = v.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    for j in range(K):
        m = tl.max(tl.where(avail, key, -2147483648), 1)
        # the lowest available column holding the maximum (a row of -inf still has one: K <= E)
        idx = tl.min(tl.where(avail & (key == m[:, None]), cols[None, :], BLOCK_E), 1)
        tl.store(out_ptr + rows.to(tl.int64) * K + j, idx.to(tl.int64), mask=mask_t)
        avail = avail & (cols[None, :] != idx[:, None])


@torch.library.custom_op("moeflow::topk_indices", mutates_args=())
def topk_indices_triton(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """(T, k) int64 indices of each row's k largest scores (see the module docstring for order and ties).
    A custom op, so torch.compile traces a gate that calls it."""
    T, E = scores_TE.shape
    if not 1 <= k <= E or E > MAX_EXPERTS:
        raise ValueError(f"top-k kernel: need 1 <= k <= E <= {MAX_EXPERTS}, got k={k}, E={E}")
    if scores_TE.stride(1) != 1:
        scores_TE = scores_TE.contiguous()
    out = torch.empty(T, k, dtype=torch.int64, device=scores_TE.device)
    if T:
        block_e = max(16, triton.next_power_of_2(E))
        block_t = max(1, min(64, 4096 // block_e))
        _topk_rows_kernel[(triton.cdiv(T, block_t),)](
            scores_TE, out, T, E, scores_TE.stride(0), k, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4
        )
    return out


@topk_indices_triton.register_fake
def _(scores_TE, k):
    return scores_TE.new_empty(scores_TE.shape[0], k, dtype=torch.int64)


def topk_indices(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """`scores_TE.topk(k, dim=-1).indices`, through the Triton kernel for CUDA rows of at most
    MAX_EXPERTS scores, torch.topk elsewhere (the CPU, wider rows; no gradient either way)."""
    scores_TE = scores_TE.detach()
    if scores_TE.is_cuda and scores_TE.dim() == 2 and scores_TE.shape[1] <= MAX_EXPERTS and _KERNEL_ON:
        return topk_indices_triton(scores_TE, k)
    return scores_TE.topk(k, dim=-1).indices
