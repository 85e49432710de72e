"""Triton grouped GEMMs over variable-size expert groups (ScatterMoE style).

Rows arrive grouped by expert: expert e owns rows [start_e, start_e + counts_E[e]) of the
grouped order. No padding to a capacity: every kernel finds its (expert, row block) from
counts_E on the device (`_expert_tiling`, `_tile_of`), so one launch covers all experts and
needs no host sync.

Launch: one program per output tile, or (an autotune candidate) one per SM walking the tiles; the
persistent `gmm` runs the next tile's first loads under this tile's stores (one flattened pipeline).

Contiguous operands are read through Hopper's TMA (`tma.py`), others through pointer loads.

Kernels (all write every output element exactly once; no atomics, so results are
bit-deterministic for fixed inputs):
- `up`:       h = x[gather] @ W1[e] (and W3[e]); g = act(h) fused in the epilogue.
- `gmm`:      out[scatter] = scale * sum_p A_p[gather] @ B_p[e]  (down projection; dX of the
              up GEMM; dG = dy[token] @ W2[e]^T of the down GEMM).
- `act_bwd`:  the activation's backward over dG, h1, h3, and the gate-weight gradient.
- `wgrad`:    dW[e] = A[gather]^T @ (scale * B[gather]) over expert e's rows.

Row movement (fan-out, segment sums, the aligned layout) lives in `permute.py`; candidate
tiles and grids in `autotune.py`; TMA descriptors in `tma.py`.

Nothing here knows about models: tensors, strides, group sizes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .autotune import (
    GMM_SHAPES,
    INTERPRET,
    UP_SHAPES,
    WGRAD_SHAPES,
    candidate_configs,
    e_pow2,
    even_k,
    fits_gmm,
    fits_wgrad,
    grid_for,
    m_bucket,
    m_grid,
    persist_tuning,
)
from .tma import GMM_BOXES, UP_BOXES, WGRAD_BOXES, desc_pair, rows_desc, weight_desc


@triton.jit
def _expert_tiling(counts_ptr, E, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Row blocks per expert from counts_E: (counts, blocks, cumulative blocks, cumulative rows, total blocks)."""
    offs_e = tl.arange(0, E_POW2)
    cnt = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    cum_tiles = tl.cumsum(tiles, 0)
    return cnt, tiles, cum_tiles, tl.cumsum(cnt, 0), tl.sum(tiles, 0)


@triton.jit
def _tile_of(pid_m, cnt, tiles, cum_tiles, cum_rows, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    """Map a global row-block index to (expert, first row, end row) through `_expert_tiling`'s vectors."""
    e = tl.sum((cum_tiles <= pid_m).to(tl.int32), 0)
    sel = tl.arange(0, E_POW2) == e
    first_tile = tl.sum(tl.where(sel, cum_tiles - tiles, 0), 0)
    start_e = tl.sum(tl.where(sel, cum_rows - cnt, 0), 0)
    end_e = tl.sum(tl.where(sel, cum_rows, 0), 0)
    return e, start_e + (pid_m - first_tile) * BLOCK_M, end_e


@triton.jit
def _indexed(idx_ptr, rows, mask, INDEXED: tl.constexpr):
    """int64 positions of `rows`: read through an index array (a gather or scatter), or the rows themselves."""
    if INDEXED:
        pos = tl.load(idx_ptr + rows, mask=mask, other=0).to(tl.int64)
    else:
        pos = rows.to(tl.int64)
    return pos


@triton.jit
def _swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Group row blocks so consecutive programs share weight tiles in L2."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _silu(x):
    return x * tl.sigmoid(x)


@triton.jit
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh written through sigmoid
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x * tl.sigmoid(2.0 * u)


@triton.jit
def _gelu_tanh_grad(x):
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


# ----------------------------------------------------------------------------- tile loads
@triton.jit
def _load_rows(desc, ptrs, row0, k0, mask_m, offs_k, K, TMA: tl.constexpr, EVEN_K: tl.constexpr):
    """A (BLOCK_M, BLOCK_K) tile of row-major activations at (row0, k0).

    TMA: one box from the (rows, K) tensor; rows past row_end belong to the next expert (or
    are zero past the tensor) and are dropped by the caller's store mask.
    """
    if TMA:
        a = desc.load([row0, k0])
    elif EVEN_K:
        a = tl.load(ptrs, mask=mask_m[:, None], other=0.0)
    else:
        a = tl.load(ptrs, mask=mask_m[:, None] & (offs_k < K - k0)[None, :], other=0.0)
    return a


@triton.jit
def _load_weight(
    desc, ptrs, e_row, k0, n0, mask_n, offs_k, K, TMA: tl.constexpr, TRANS: tl.constexpr, EVEN_K: tl.constexpr
):
    """A (BLOCK_K, BLOCK_N) tile of expert e's weight at (k0, n0).

    TMA reads the weights as one 2-D (E * rows, cols) tensor, e_row = e * rows: with TRANS the
    stored matrix is (N, K) and the box (BLOCK_N, BLOCK_K) is transposed in shared memory.
    A box past K would read the next expert's rows, so the untransposed layout needs K to be a
    multiple of BLOCK_K (else: pointer loads); past N only masked-out columns are touched.
    """
    if TMA and TRANS:
        b = desc.load([e_row + n0, k0]).T
    elif TMA and EVEN_K:
        b = desc.load([e_row + k0, n0])
    elif EVEN_K:
        b = tl.load(ptrs, mask=mask_n[None, :], other=0.0)
    else:
        b = tl.load(ptrs, mask=(offs_k < K - k0)[:, None] & mask_n[None, :], other=0.0)
    return b


# ----------------------------------------------------------------------------- up
# Tile loop of `up` and `gmm`: program p walks tiles p, p + P, ... of the (row block, column
# block) grid, P = the launch's program count. One program per tile (P = the grid's upper
# bound) or persistent (P = the SM count): then the K loops of consecutive tiles are
# flattened into one software pipeline, so the next tile's first loads overlap this tile's
# last products and its stores (`tl.range(flatten=True)`).
@triton.autotune(configs=candidate_configs(UP_SHAPES, UP_BOXES), key=["N", "K", "SWIGLU", "M_BUCKET", "A_TMA", "W_TMA"])
@triton.heuristics({"EVEN_K": even_k})
@triton.jit
def _up_kernel(
    x_ptr,
    x_desc,
    idx_ptr,
    w1_ptr,
    w3_ptr,
    w1_desc,
    w3_desc,
    h1_ptr,
    h3_ptr,
    g_ptr,
    counts_ptr,
    E,
    N,
    K,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_we,
    stride_wk,
    stride_wn,
    HAS_GATHER: tl.constexpr,
    A_TMA: tl.constexpr,
    W_TMA: tl.constexpr,
    SWIGLU: tl.constexpr,
    STORE_H: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    num_n = tl.cdiv(N, BLOCK_N)
    cnt, tiles, cum_tiles, cum_rows, num_m = _expert_tiling(counts_ptr, E, BLOCK_M, E_POW2)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=PERSISTENT):
        pid_m, pid_n = _swizzle(tile, num_m, num_n, GROUP_M)
        e, row0, row_end = _tile_of(pid_m, cnt, tiles, cum_tiles, cum_rows, BLOCK_M, E_POW2)
        rows = row0 + tl.arange(0, BLOCK_M)
        mask_m = rows < row_end
        src = _indexed(idx_ptr, rows, mask_m, HAS_GATHER)
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        a_ptrs = x_ptr + src[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_off = e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        b1_ptrs = w1_ptr + w_off
        b3_ptrs = w3_ptr + w_off
        e_row = e * K
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            k0 = kk * BLOCK_K
            a = _load_rows(x_desc, a_ptrs, row0, k0, mask_m, offs_k, K, A_TMA, EVEN_K)
            b1 = _load_weight(w1_desc, b1_ptrs, e_row, k0, n0, mask_n, offs_k, K, W_TMA, False, EVEN_K)
            acc1 = tl.dot(a, b1, acc1)
            if SWIGLU:
                b3 = _load_weight(w3_desc, b3_ptrs, e_row, k0, n0, mask_n, offs_k, K, W_TMA, False, EVEN_K)
                acc3 = tl.dot(a, b3, acc3)
            a_ptrs += BLOCK_K * stride_xk
            b1_ptrs += BLOCK_K * stride_wk
            b3_ptrs += BLOCK_K * stride_wk
        out_off = rows.to(tl.int64)[:, None] * N + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        if SWIGLU:
            g = _silu(acc1) * acc3
        else:
            g = _gelu_tanh(acc1)
        tl.store(g_ptr + out_off, g.to(g_ptr.dtype.element_ty), mask=mask)
        if STORE_H:
            tl.store(h1_ptr + out_off, acc1.to(h1_ptr.dtype.element_ty), mask=mask)
            if SWIGLU:
                tl.store(h3_ptr + out_off, acc3.to(h3_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- gmm
@triton.jit
def _dot_loop(
    acc,
    a_desc,
    a_ptrs,
    b_desc,
    b_ptrs,
    row0,
    e_row,
    n0,
    mask_m,
    mask_n,
    offs_k,
    K,
    stride_ak,
    stride_bk,
    A_TMA: tl.constexpr,
    B_TMA: tl.constexpr,
    B_TRANS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """acc += A @ B over the K dimension, one (A, B) tile pair per pipeline stage."""
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        k0 = kk * BLOCK_K
        a = _load_rows(a_desc, a_ptrs, row0, k0, mask_m, offs_k, K, A_TMA, EVEN_K)
        b = _load_weight(b_desc, b_ptrs, e_row, k0, n0, mask_n, offs_k, K, B_TMA, B_TRANS, EVEN_K)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


def _flatten(args):
    """Flatten the persistent tile loop only over one K loop (TWO runs two in sequence)."""
    return args["PERSISTENT"] and not args["TWO"]


@triton.autotune(
    configs=candidate_configs(GMM_SHAPES, GMM_BOXES),
    key=["N", "K", "TWO", "HAS_GATHER", "M_BUCKET", "A_TMA", "B_TMA"],
    prune_configs_by={"early_config_prune": fits_gmm},
)
@triton.heuristics({"EVEN_K": even_k, "FLATTEN": _flatten})
@triton.jit
def _gmm_kernel(
    a1_ptr,
    b1_ptr,
    a2_ptr,
    b2_ptr,
    a1_desc,
    b1_desc,
    a2_desc,
    b2_desc,
    out_ptr,
    scale_ptr,
    gather_ptr,
    scatter_ptr,
    counts_ptr,
    E,
    N,
    K,
    M_BUCKET,
    stride_am,
    stride_ak,
    stride_be,
    stride_bk,
    stride_bn,
    stride_om,
    TWO: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_GATHER: tl.constexpr,
    HAS_SCATTER: tl.constexpr,
    A_TMA: tl.constexpr,
    B_TMA: tl.constexpr,
    B_TRANS: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    PERSISTENT: tl.constexpr,
    FLATTEN: tl.constexpr,
):
    num_n = tl.cdiv(N, BLOCK_N)
    cnt, tiles, cum_tiles, cum_rows, num_m = _expert_tiling(counts_ptr, E, BLOCK_M, E_POW2)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_n = _swizzle(tile, num_m, num_n, GROUP_M)
        e, row0, row_end = _tile_of(pid_m, cnt, tiles, cum_tiles, cum_rows, BLOCK_M, E_POW2)
        rows = row0 + tl.arange(0, BLOCK_M)
        mask_m = rows < row_end
        src = _indexed(gather_ptr, rows, mask_m, HAS_GATHER)
        n0 = pid_n * BLOCK_N
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        a_off = src[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_off = e.to(tl.int64) * stride_be + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        e_row = e * N if B_TRANS else e * K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _dot_loop(
            acc,
            a1_desc,
            a1_ptr + a_off,
            b1_desc,
            b1_ptr + b_off,
            row0,
            e_row,
            n0,
            mask_m,
            mask_n,
            offs_k,
            K,
            stride_ak,
            stride_bk,
            A_TMA,
            B_TMA,
            B_TRANS,
            BLOCK_K,
            EVEN_K,
        )
        if TWO:  # a second loop, not a second dot per step: one operand pair per stage fits wider tiles
            acc = _dot_loop(
                acc,
                a2_desc,
                a2_ptr + a_off,
                b2_desc,
                b2_ptr + b_off,
                row0,
                e_row,
                n0,
                mask_m,
                mask_n,
                offs_k,
                K,
                stride_ak,
                stride_bk,
                A_TMA,
                B_TMA,
                B_TRANS,
                BLOCK_K,
                EVEN_K,
            )
        if HAS_SCALE:
            s = tl.load(scale_ptr + rows, mask=mask_m, other=0.0).to(tl.float32)
            acc = acc * s[:, None]
        dst = _indexed(scatter_ptr, rows, mask_m, HAS_SCATTER)
        omask = mask_m[:, None] & mask_n[None, :]
        if HAS_SCATTER:  # the pad rows of an aligned layout have no destination (-1)
            omask = omask & (dst >= 0)[:, None]
        tl.store(out_ptr + dst[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)


# ----------------------------------------------------------------------------- activation backward
@triton.jit
def _act_bwd_kernel(
    dg_ptr,
    h1_ptr,
    h3_ptr,
    scale_ptr,
    gw_ptr,
    dh1_ptr,
    dh3_ptr,
    dscale_ptr,
    counts_ptr,
    E,
    F,
    SWIGLU: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """From dG = dL/d(scale * g) (unscaled by the gate weight): dh1, dh3, scale * g and dL/dscale.

    One program owns BLOCK_R whole rows, so the gate-weight gradient <dG, g> of each row is
    summed in one place, in column order: deterministic. Outputs may alias inputs
    (gw over dG, dh1 over h1, dh3 over h3): every tile is read before it is written.
    Rows past the groups' total (the spare rows of an aligned layout) are neither read nor written.
    """
    offs_e = tl.arange(0, E_POW2)
    R = tl.sum(tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0), 0)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    rows64 = rows.to(tl.int64)
    if HAS_SCALE:
        s = tl.load(scale_ptr + rows, mask=mask_r, other=0.0).to(tl.float32)
    dsum = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        cols = f0 + tl.arange(0, BLOCK_F)
        mask = mask_r[:, None] & (cols < F)[None, :]
        off = rows64[:, None] * F + cols[None, :]
        dg = tl.load(dg_ptr + off, mask=mask, other=0.0).to(tl.float32)
        h1 = tl.load(h1_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if SWIGLU:
            h3 = tl.load(h3_ptr + off, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(h1)
            act = h1 * sig
            dact = sig + act * (1.0 - sig)  # d silu(h1) / d h1
            g = act * h3
        else:
            g = _gelu_tanh(h1)
            dact = _gelu_tanh_grad(h1)
        if HAS_SCALE:
            dsum += tl.sum(dg * g, 1)
            dg = dg * s[:, None]
            g = g * s[:, None]  # dW2 then needs no scale: dW2 = (s * g)^T @ dy
        tl.store(gw_ptr + off, g.to(gw_ptr.dtype.element_ty), mask=mask)
        if SWIGLU:
            tl.store(dh3_ptr + off, (dg * act).to(dh3_ptr.dtype.element_ty), mask=mask)
            tl.store(dh1_ptr + off, (dg * h3 * dact).to(dh1_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(dh1_ptr + off, (dg * dact).to(dh1_ptr.dtype.element_ty), mask=mask)
    if HAS_SCALE:
        tl.store(dscale_ptr + rows, dsum, mask=mask_r)


# ----------------------------------------------------------------------------- weight gradient
@triton.autotune(
    configs=candidate_configs(WGRAD_SHAPES, WGRAD_BOXES),
    key=["M", "N", "TWO", "R_BUCKET", "A_TMA", "B_TMA"],
    prune_configs_by={"early_config_prune": fits_wgrad},
)
@triton.jit
def _wgrad_kernel(
    a_ptr,
    ia_ptr,
    b1_ptr,
    b2_ptr,
    ib_ptr,
    a_desc,
    b1_desc,
    b2_desc,
    scale_ptr,
    out1_ptr,
    out2_ptr,
    counts_ptr,
    E,
    M,
    N,
    R_BUCKET,
    stride_ar,
    stride_am,
    stride_br,
    stride_bn,
    A_GATHER: tl.constexpr,
    B_GATHER: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    TWO: tl.constexpr,
    A_TMA: tl.constexpr,
    B_TMA: tl.constexpr,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr,
):
    """out_p[e] (M x N) = sum over expert e's rows r of A[ia[r]]^T (scale[r] * B_p[ib[r]]).

    BLOCK_K is the row chunk. Each output tile of one expert is computed by one program,
    which walks that expert's rows in order: deterministic, and empty experts get exact zeros.
    TMA boxes (contiguous operands only) cannot stop at the expert's last row; the launcher
    uses one only when the other operand is loaded masked, whose zero rows cancel the
    overrun (a non-finite value in another expert's rows would still leak in as NaN), or
    for both operands when the groups are aligned (`wgrad(aligned=True)`: no overrun).
    """
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_e = num_m * num_n
    offs_e = tl.arange(0, E_POW2)
    cnt = tl.load(counts_ptr + offs_e, mask=offs_e < E, other=0)
    cum = tl.cumsum(cnt, 0)
    # PERSISTENT only sizes the launch (`autotune.grid_for`): programs walk tiles pid, pid + P, ... either way.
    # The row loop's length differs per expert, so Triton cannot flatten it with the tile loop (a
    # hand-flattened single loop ran at half the rate: bench/RESULTS.md); each tile fills its own pipeline.
    for tile in tl.range(tl.program_id(0), E * per_e, tl.num_programs(0)):
        e = tile // per_e
        pid_m, pid_n = _swizzle(tile % per_e, num_m, num_n, GROUP_M)
        sel = offs_e == e
        start = tl.sum(tl.where(sel, cum - cnt, 0), 0)
        end = tl.sum(tl.where(sel, cum, 0), 0)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_K):
            rows = r0 + tl.arange(0, BLOCK_K)
            mask_r = rows < end
            ra = _indexed(ia_ptr, rows, mask_r, A_GATHER)
            rb = _indexed(ib_ptr, rows, mask_r, B_GATHER)
            if A_TMA:
                a = a_desc.load([r0, m0]).T  # (BLOCK_M, BLOCK_K) = A^T tile
            else:
                a = tl.load(
                    a_ptr + ra[None, :] * stride_ar + offs_m[:, None] * stride_am,
                    mask=mask_r[None, :] & mask_m[:, None],
                    other=0.0,
                )
            b_off = rb[:, None] * stride_br + offs_n[None, :] * stride_bn
            bmask = mask_r[:, None] & mask_n[None, :]
            if B_TMA:
                b1 = b1_desc.load([r0, n0])
            else:
                b1 = tl.load(b1_ptr + b_off, mask=bmask, other=0.0)
            if HAS_SCALE:
                s = tl.load(scale_ptr + rows, mask=mask_r, other=0.0).to(tl.float32)
                b1 = (b1.to(tl.float32) * s[:, None]).to(a.dtype)
            acc1 = tl.dot(a, b1, acc1)
            if TWO:
                if B_TMA:
                    b2 = b2_desc.load([r0, n0])
                else:
                    b2 = tl.load(b2_ptr + b_off, mask=bmask, other=0.0)
                acc2 = tl.dot(a, b2, acc2)
        o_off = e.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        omask = mask_m[:, None] & mask_n[None, :]
        tl.store(out1_ptr + o_off, acc1.to(out1_ptr.dtype.element_ty), mask=omask)
        if TWO:
            tl.store(out2_ptr + o_off, acc2.to(out2_ptr.dtype.element_ty), mask=omask)


persist_tuning(_up_kernel, _gmm_kernel, _wgrad_kernel)  # tuned configs kept on disk across processes (autotune.py)


# ============================================================================= launchers
def up(x, gather_A, w1, w3, counts_E, A: int, store_h: bool):
    """g, h1, h3 for A grouped rows; x rows are read through gather_A (None: x is grouped)."""
    E, K, N = w1.shape
    swiglu = w3 is not None
    g = x.new_empty(A, N)
    h1 = x.new_empty(A, N) if store_h else g
    h3 = x.new_empty(A, N) if (store_h and swiglu) else g
    if A == 0:
        return g, h1, h3
    if w3 is not None:
        assert w3.stride() == w1.stride()
    x_desc = rows_desc(x) if gather_A is None else None
    w_descs = desc_pair(weight_desc, w1, w3)
    _up_kernel[m_grid(A, E, N, x.device)](
        x,
        x_desc if x_desc is not None else x,
        gather_A if gather_A is not None else counts_E,
        w1,
        w3 if swiglu else w1,
        *(w_descs or (w1, w1)),
        h1,
        h3,
        g,
        counts_E,
        E,
        N,
        K,
        m_bucket(A),
        x.stride(0),
        x.stride(1),
        w1.stride(0),
        w1.stride(1),
        w1.stride(2),
        HAS_GATHER=gather_A is not None,
        A_TMA=x_desc is not None,
        W_TMA=w_descs is not None,
        SWIGLU=swiglu,
        STORE_H=store_h,
        E_POW2=e_pow2(E),
    )
    return g, h1, h3


def _launch_gmm(a1, b1, a2, b2, out, scale, scatter, counts_E, A: int, N: int, K: int, b_trans: bool, gather=None):
    """out[scatter] = scale * (a1[gather] @ B1[e] + a2[gather] @ B2[e]); B_p[e] = b_p[e] or b_p[e]^T (b_trans)."""
    E = counts_E.shape[0]
    if a2 is not None:
        assert a2.stride() == a1.stride()
    if b2 is not None:
        assert b2.stride() == b1.stride()
    stride_be, stride_bk, stride_bn = (b1.stride(0), b1.stride(2), b1.stride(1)) if b_trans else b1.stride()
    a_descs = desc_pair(rows_desc, a1, a2) if gather is None else None
    b_descs = desc_pair(weight_desc, b1, b2)
    (a1_desc, a2_desc), (b1_desc, b2_desc) = a_descs or (a1, a1), b_descs or (b1, b1)
    _gmm_kernel[m_grid(A, E, N, out.device)](
        a1,
        b1,
        a2 if a2 is not None else a1,
        b2 if b2 is not None else b1,
        a1_desc,
        b1_desc,
        a2_desc,
        b2_desc,
        out,
        scale if scale is not None else counts_E,
        gather if gather is not None else counts_E,
        scatter if scatter is not None else counts_E,
        counts_E,
        E,
        N,
        K,
        m_bucket(A),
        a1.stride(0),
        a1.stride(1),
        stride_be,
        stride_bk,
        stride_bn,
        out.stride(0),
        TWO=a2 is not None,
        HAS_SCALE=scale is not None,
        HAS_GATHER=gather is not None,
        HAS_SCATTER=scatter is not None,
        A_TMA=a_descs is not None,
        B_TMA=b_descs is not None,
        B_TRANS=b_trans,
        E_POW2=e_pow2(E),
    )


def down(g, w2, counts_E, scale_A=None, scatter_A=None, out_rows: int | None = None):
    """out[scatter_A[a]] = scale_A[a] * g[a] @ w2[e(a)]; rows not named by scatter stay unwritten."""
    A, K = g.shape
    E, _, N = w2.shape
    out = g.new_empty(out_rows if out_rows is not None else A, N)
    if A:
        _launch_gmm(g, w2, None, None, out, scale_A, scatter_A, counts_E, A, N, K, b_trans=False)
    return out


def grad_input(dh1, w1, dh3, w3, counts_E, scatter_A=None):
    """dx[scatter_A[a]] = dh1[a] @ w1[e]^T (+ dh3[a] @ w3[e]^T): the up GEMM's input gradient."""
    A, K = dh1.shape  # K = F
    E, N, _ = w1.shape  # N = D
    out = dh1.new_empty(A, N)
    if A:
        _launch_gmm(dh1, w1, dh3, w3, out, None, scatter_A, counts_E, A, N, K, b_trans=True)
    return out


def down_bwd(dy, gather_A, w2, h1, h3, scale_A, counts_E, swiglu: bool, in_place: bool = False):
    """dh1, dh3 (SwiGLU), scale_A * g and the gate-weight grad (None without scale) from dy.

    Two launches: dG = dy[gather] @ W2[e]^T (the grouped GEMM at full speed), then the
    activation backward over dG, h1, h3. Fusing the second into the GEMM's epilogue was
    tried first: its extra live tiles spilled or forced narrow tiles, and it ran at half
    the GEMM's rate (bench/RESULTS.md). `in_place`: dh1/dh3 overwrite h1/h3, saving
    2*A*F elements of peak memory when h is dead afterwards.
    """
    A, F = h1.shape
    E, _, D = w2.shape
    dg = h1.new_empty(A, F)  # becomes scale * g in place
    dh1 = h1 if in_place else h1.new_empty(A, F)
    dh3 = (h3 if in_place else h1.new_empty(A, F)) if swiglu else dh1
    if A == 0:
        return dh1, dh3, dg, (h1.new_zeros(0, dtype=torch.float32) if scale_A is not None else None)
    _launch_gmm(dy, w2, None, None, dg, None, None, counts_E, A, F, D, b_trans=True, gather=gather_A)
    dscale = torch.empty(A, device=h1.device, dtype=torch.float32) if scale_A is not None else None
    block_r, block_f = (16, 16) if INTERPRET else (8, 256)
    _act_bwd_kernel[(triton.cdiv(A, block_r),)](
        dg,
        h1,
        h3 if swiglu else h1,
        scale_A if scale_A is not None else dg,
        dg,
        dh1,
        dh3,
        dscale if dscale is not None else dg,
        counts_E,
        E,
        F,
        SWIGLU=swiglu,
        HAS_SCALE=scale_A is not None,
        E_POW2=e_pow2(E),
        BLOCK_R=block_r,
        BLOCK_F=block_f,
        num_warps=4,
    )
    return dh1, dh3, dg, dscale


def wgrad(a, gather_a, b1, b2, gather_b, scale, counts_E, aligned: bool = False):
    """out_p[e] = a[gather_a][rows of e]^T @ (scale * b_p[gather_b][rows of e]), shape (E, Ka, Nb).

    At most one operand is read through TMA, and only when the other one is loaded with the
    row mask (see `_wgrad_kernel`): B when it is contiguous (it may be two tensors), else A.
    `aligned`: every expert's rows start on a multiple of ROW_ALIGN and its pad rows up to the next
    multiple are zeros in a or b, so no row chunk crosses into the next expert and both contiguous
    operands are read through TMA, unmasked.
    """
    E = counts_E.shape[0]
    M = a.shape[1]
    N = b1.shape[1]
    out1 = a.new_empty(E, M, N)
    out2 = a.new_empty(E, M, N) if b2 is not None else out1
    R = b1.shape[0] if gather_b is None else gather_b.shape[0]
    if b2 is not None:
        assert b2.stride() == b1.stride()
    b_descs = desc_pair(rows_desc, b1, b2) if gather_b is None else None
    a_desc = rows_desc(a) if gather_a is None and (b_descs is None or aligned) else None
    grid = grid_for(lambda meta: E * triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), a.device)
    _wgrad_kernel[grid](
        a,
        gather_a if gather_a is not None else counts_E,
        b1,
        b2 if b2 is not None else b1,
        gather_b if gather_b is not None else counts_E,
        a_desc if a_desc is not None else a,
        *(b_descs or (b1, b1)),
        scale if scale is not None else counts_E,
        out1,
        out2,
        counts_E,
        E,
        M,
        N,
        m_bucket(R),
        a.stride(0),
        a.stride(1),
        b1.stride(0),
        b1.stride(1),
        A_GATHER=gather_a is not None,
        B_GATHER=gather_b is not None,
        HAS_SCALE=scale is not None,
        TWO=b2 is not None,
        A_TMA=a_desc is not None,
        B_TMA=b_descs is not None,
        E_POW2=e_pow2(E),
    )
    return out1, (out2 if b2 is not None else None)
