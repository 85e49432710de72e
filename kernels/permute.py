"""Row movement for the experts: routed rows into expert order and back, deterministically.

- `fan_out`:  the routed copies of each token row in expert order (each source row read once); pad rows zeroed.
- `segsum`:   y_T[t] = sum of the rows of token t in order (the deterministic half of un-permute).
- `aligned_layout`: the routed rows' places when each expert's group is padded to a multiple of
  ROW_ALIGN (the weight gradients then read both operands through TMA, unmasked).

Nothing here knows about models: tensors, index arrays, group sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import INTERPRET, ROW_ALIGN, e_pow2


# ----------------------------------------------------------------------------- segment sum
@triton.jit
def _segsum_kernel(src_ptr, offs_ptr, out_ptr, D, BLOCK_D: tl.constexpr):
    """out[t] = sum of src rows [offs[t], offs[t+1]) in order (fp32 accumulate); 0 if none."""
    t = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = offs_d < D
    start = tl.load(offs_ptr + t)
    end = tl.load(offs_ptr + t + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row_ptrs = src_ptr + start.to(tl.int64) * D + offs_d
    for _ in range(start, end):
        acc += tl.load(row_ptrs, mask=mask, other=0.0).to(tl.float32)
        row_ptrs += D
    tl.store(out_ptr + t.to(tl.int64) * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- row fan-out
@triton.jit
def _fan_out_kernel(src_ptr, offs_ptr, dest_ptr, out_ptr, D, stride_s, BLOCK_D: tl.constexpr):
    """out[dest[a]] = src[t] for token t's rows a in [offs[t], offs[t+1]): segsum's transpose.
    Each source row is read once (a gather by destination row reads it once per copy)."""
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    start = tl.load(offs_ptr + t)
    end = tl.load(offs_ptr + t + 1)
    v = tl.load(src_ptr + t.to(tl.int64) * stride_s + cols, mask=mask)
    for a in range(start, end):
        row = tl.load(dest_ptr + a).to(tl.int64)
        tl.store(out_ptr + row * D + cols, v, mask=mask)


@triton.jit
def _zero_pad_rows_kernel(
    idx_ptr, counts_ptr, out_ptr, E, D, E_POW2: tl.constexpr, PAD: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Zero the pad rows (idx < 0) among the last PAD rows of expert e's group (program e): the
    groups of an aligned layout end with fewer than PAD of them."""
    offs_e = tl.arange(0, E_POW2)
    cnt = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    end = tl.sum(tl.where(offs_e == tl.program_id(0), tl.cumsum(cnt, 0), 0), 0)
    size = tl.sum(tl.where(offs_e == tl.program_id(0), cnt, 0), 0)
    rows = end - PAD + tl.arange(0, PAD)
    in_group = rows >= end - size
    idx = tl.load(idx_ptr + rows, mask=in_group, other=0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    zeros = tl.zeros((PAD, BLOCK_D), dtype=out_ptr.dtype.element_ty)
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
        zeros,
        mask=(in_group & (idx < 0))[:, None] & (cols < D)[None, :],
    )


# ----------------------------------------------------------------------------- aligned layout
@triton.jit
def _aligned_layout_kernel(
    counts_ptr,
    token_ptr,
    pos_ptr,
    weight_ptr,
    counts_out,
    token_out,
    pos_out,
    weight_out,
    dest_out,
    row_of_pos_out,
    E,
    P,
    ALIGN: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Rows [pid * BLOCK, ...) of the aligned layout (each expert's group starts on a multiple of ALIGN):
    the assignment each row holds, or -1 / weight 0 on pad rows; and, for each assignment held, its row
    (dest_out by expert-sorted index, row_of_pos_out by token-sorted position)."""
    offs_e = tl.arange(0, E_POW2)
    cnt = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0).to(tl.int32)
    cnt_p = (cnt + ALIGN - 1) // ALIGN * ALIGN
    end_p = tl.cumsum(cnt_p, 0)
    start = tl.cumsum(cnt, 0) - cnt
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.sum((end_p[None, :] <= rows[:, None]).to(tl.int32), 1)  # the group holding each row (E_POW2 past the last)
    sel = offs_e[None, :] == e[:, None]
    r = rows - tl.sum(tl.where(sel, (end_p - cnt_p)[None, :], 0), 1)  # row within the padded group
    real = (r < tl.sum(tl.where(sel, cnt[None, :], 0), 1)) & (rows < P)
    a = tl.sum(tl.where(sel, start[None, :], 0), 1) + r
    pos = tl.load(pos_ptr + a, mask=real, other=-1).to(tl.int32)
    in_range = rows < P
    tl.store(token_out + rows, tl.load(token_ptr + a, mask=real, other=-1).to(tl.int32), mask=in_range)
    tl.store(pos_out + rows, pos, mask=in_range)
    tl.store(weight_out + rows, tl.load(weight_ptr + a, mask=real, other=0.0), mask=in_range)
    tl.store(dest_out + a, rows, mask=real)
    tl.store(row_of_pos_out + pos, rows, mask=real)
    if tl.program_id(0) == 0:
        tl.store(counts_out + offs_e, cnt_p, mask=offs_e < E)


# ============================================================================= launchers
def aligned_layout(counts_E, token_A, pos_A, weight_A, align: int = ROW_ALIGN):
    """One launch for the aligned layout of `kernels.ops.aligned_layout` (which adds the autograd):
    counts_P, token_P, pos_P, weight_P, dest_A (row of each expert-sorted assignment) and expert_row_A
    (row of each token-sorted assignment). P = A + (align - 1) * min(E, A) rows, known without a sync."""
    A, E = token_A.shape[0], counts_E.shape[0]
    P = A + (align - 1) * min(E, A)
    dev = token_A.device
    counts_P = torch.empty(E, dtype=torch.int32, device=dev)
    token_P, pos_P = (torch.empty(P, dtype=torch.int32, device=dev) for _ in range(2))
    weight_P = weight_A.new_empty(P)
    dest_A, expert_row_A = (torch.empty(A, dtype=torch.int32, device=dev) for _ in range(2))
    if E:
        block = 64
        _aligned_layout_kernel[(max(1, triton.cdiv(P, block)),)](
            counts_E,
            token_A,
            pos_A,
            weight_A,
            counts_P,
            token_P,
            pos_P,
            weight_P,
            dest_A,
            expert_row_A,
            E,
            P,
            ALIGN=align,
            E_POW2=e_pow2(E),
            BLOCK=block,
            num_warps=4,
        )
    return counts_P, token_P, pos_P, weight_P, dest_A, expert_row_A


def fan_out(src, offsets, dest, num_rows: int, pads=None, out=None):
    """A new (num_rows, D) matrix holding src row t at rows dest[offsets[t]:offsets[t+1]], each source row
    read once (a gather by destination row reads it once per copy). `pads` = (idx_P, counts_P) of an
    aligned layout: its pad rows inside each group (idx_P < 0) are zeroed; rows past the last group are
    left unwritten (no kernel reads them unmasked)."""
    if src.stride(-1) != 1:
        src = src.contiguous()
    R, D = num_rows, src.shape[1]
    out = src.new_empty(R, D) if out is None else out
    if R and D:
        block_d = 16 if INTERPRET else min(4096, triton.next_power_of_2(D))
        _fan_out_kernel[(offsets.shape[0] - 1, triton.cdiv(D, block_d))](
            src, offsets, dest, out, D, src.stride(0), BLOCK_D=block_d, num_warps=4
        )
        if pads is not None:
            idx, counts_P = pads
            E = counts_P.shape[0]
            block_d = 16 if INTERPRET else min(256, triton.next_power_of_2(D))
            _zero_pad_rows_kernel[(E, triton.cdiv(D, block_d))](
                idx, counts_P, out, E, D, E_POW2=e_pow2(E), PAD=ROW_ALIGN, BLOCK_D=block_d, num_warps=4
            )
    return out


def segsum(src, offsets, num_rows: int, out=None):
    """out[t] = sum(src[offsets[t]:offsets[t+1]]) in order, fp32 accumulate."""
    D = src.shape[1]
    out = src.new_empty(num_rows, D) if out is None else out
    if num_rows:
        block = 16 if INTERPRET else min(1024, triton.next_power_of_2(D))
        _segsum_kernel[(num_rows, triton.cdiv(D, block))](src, offsets, out, D, BLOCK_D=block, num_warps=4)
    return out
