"""Development probe, not used by the product: the aligned weight gradient as a warp-specialised
Gluon kernel for Hopper, timed against the Triton `wgrad` on case-3 shapes (bench/RESULTS.md, item 27).

    python bench/tools/gluon_wgrad_probe.py        (a Hopper GPU; Triton 3.6's Gluon: later versions renamed
                                                the TMA copies, e.g. tma.async_load in 3.9)

out[e] (M x N) = A[rows of e]^T @ B[rows of e] over groups aligned to BLOCK_K rows (`aligned_layout`).
One TMA warp loads every tile's row chunks into a ring of shared-memory slots, running ahead across
tiles; MMA warps (wgmma, accumulator in registers) consume them and store through shared memory
with TMA. `CONSUMERS=1`: one 8-warp MMA partition per tile ("cooperative"); `CONSUMERS=2`: two
4-warp MMA partitions take alternate tiles ("ping-pong"), so one's epilogue runs under the other's
products. What it showed: both reach the Triton kernels' ~600 TFLOP/s, not cuBLAS's ~720.
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _tile_coords(t, per_e, num_n, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    e = t // per_e
    r = t % per_e
    return e, (r // num_n) * BLOCK_M, (r % num_n) * BLOCK_N


@gluon.jit
def _load_partition(
    a_desc,
    b_desc,
    offs_ptr,
    a_bufs,
    b_bufs,
    empty,
    ready,
    total,
    per_e,
    num_n,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    NBUF: gl.constexpr,
):
    idx = 0
    for t in range(gl.program_id(0), total, gl.num_programs(0)):
        e, m0, n0 = _tile_coords(t, per_e, num_n, BLOCK_M, BLOCK_N)
        start = gl.load(offs_ptr + e)
        end = gl.load(offs_ptr + e + 1)
        for r0 in range(start, end, BLOCK_K):
            s = idx % NBUF
            mbarrier.wait(empty.index(s), ((idx // NBUF) & 1) ^ 1)
            mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [r0, m0], ready.index(s), a_bufs.index(s))
            tma.async_copy_global_to_shared(b_desc, [r0, n0], ready.index(s), b_bufs.index(s))
            idx += 1


@gluon.jit
def _mma_partition(
    out_desc,
    c_smem,
    offs_ptr,
    a_bufs,
    b_bufs,
    empty,
    ready,
    my_turn,
    their_turn,
    total,
    per_e,
    num_n,
    M,
    WHICH: gl.constexpr,
    CONSUMERS: gl.constexpr,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    NBUF: gl.constexpr,
    WARPS: gl.constexpr,
):
    """Tiles j = WHICH, WHICH + CONSUMERS, ... of this program's sequence (the others only advance the ring index).
    Two consumers take turns at the ring (my_turn / their_turn), so a slot's barrier is never more than one
    phase ahead of its waiter."""
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BLOCK_N, 16]
    )
    idx = 0
    j = 0
    for t in range(gl.program_id(0), total, gl.num_programs(0)):
        e, m0, n0 = _tile_coords(t, per_e, num_n, BLOCK_M, BLOCK_N)
        start = gl.load(offs_ptr + e)
        end = gl.load(offs_ptr + e + 1)
        if j % CONSUMERS == WHICH:
            if CONSUMERS == 2:
                mbarrier.wait(my_turn, ((j // 2) & 1) ^ (1 - WHICH))
            acc = gl.zeros((BLOCK_M, BLOCK_N), gl.float32, acc_layout)
            first = idx
            for r0 in range(start, end, BLOCK_K):
                s = idx % NBUF
                mbarrier.wait(ready.index(s), (idx // NBUF) & 1)
                acc = warpgroup_mma(a_bufs.index(s).permute((1, 0)), b_bufs.index(s), acc, is_async=True)
                acc = warpgroup_mma_wait(1, deps=[acc])
                mbarrier.arrive(
                    empty.index((idx + NBUF - 1) % NBUF), count=1, pred=idx > first
                )  # previous product done
                idx += 1
            if CONSUMERS == 2:
                mbarrier.arrive(their_turn, count=1)
            acc = warpgroup_mma_wait(0, deps=[acc])
            mbarrier.arrive(empty.index((idx + NBUF - 1) % NBUF), count=1, pred=idx > first)
            tma.store_wait(0)
            c_smem.store(acc.to(out_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(out_desc, [e * M + m0, n0], c_smem)
        else:
            idx += (end - start + BLOCK_K - 1) // BLOCK_K
        j += 1
    tma.store_wait(0)


@gluon.jit
def ws_wgrad_kernel(
    a_desc,
    b_desc,
    out_desc,
    offs_ptr,
    E,
    M,
    N,
    BLOCK_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    BLOCK_K: gl.constexpr,
    NBUF: gl.constexpr,
    CONSUMERS: gl.constexpr,
    WORKER_REGS: gl.constexpr,
    num_warps: gl.constexpr,
):
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [NBUF, BLOCK_K, BLOCK_M], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [NBUF, BLOCK_K, BLOCK_N], b_desc.layout)
    c0 = gl.allocate_shared_memory(out_desc.dtype, [BLOCK_M, BLOCK_N], out_desc.layout)
    empty = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NBUF, 1], mbarrier.MBarrierLayout())
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NBUF):
        mbarrier.init(empty.index(i), count=1)
        mbarrier.init(ready.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(turns.index(i), count=1)
    num_n = gl.cdiv(N, BLOCK_N)
    per_e = gl.cdiv(M, BLOCK_M) * num_n
    total = E * per_e
    if CONSUMERS == 2:
        c1 = gl.allocate_shared_memory(out_desc.dtype, [BLOCK_M, BLOCK_N], out_desc.layout)
        gl.warp_specialize(
            [
                (
                    _mma_partition,
                    (
                        out_desc,
                        c0,
                        offs_ptr,
                        a_bufs,
                        b_bufs,
                        empty,
                        ready,
                        turns.index(0),
                        turns.index(1),
                        total,
                        per_e,
                        num_n,
                        M,
                        0,
                        2,
                        BLOCK_M,
                        BLOCK_N,
                        BLOCK_K,
                        NBUF,
                        num_warps,
                    ),
                ),
                (
                    _mma_partition,
                    (
                        out_desc,
                        c1,
                        offs_ptr,
                        a_bufs,
                        b_bufs,
                        empty,
                        ready,
                        turns.index(1),
                        turns.index(0),
                        total,
                        per_e,
                        num_n,
                        M,
                        1,
                        2,
                        BLOCK_M,
                        BLOCK_N,
                        BLOCK_K,
                        NBUF,
                        num_warps,
                    ),
                ),
                (
                    _load_partition,
                    (
                        a_desc,
                        b_desc,
                        offs_ptr,
                        a_bufs,
                        b_bufs,
                        empty,
                        ready,
                        total,
                        per_e,
                        num_n,
                        BLOCK_M,
                        BLOCK_N,
                        BLOCK_K,
                        NBUF,
                    ),
                ),
            ],
            [num_warps, 1],
            [WORKER_REGS, 24],
        )
    else:
        gl.warp_specialize(
            [
                (
                    _mma_partition,
                    (
                        out_desc,
                        c0,
                        offs_ptr,
                        a_bufs,
                        b_bufs,
                        empty,
                        ready,
                        turns.index(0),
                        turns.index(1),
                        total,
                        per_e,
                        num_n,
                        M,
                        0,
                        1,
                        BLOCK_M,
                        BLOCK_N,
                        BLOCK_K,
                        NBUF,
                        num_warps,
                    ),
                ),
                (
                    _load_partition,
                    (
                        a_desc,
                        b_desc,
                        offs_ptr,
                        a_bufs,
                        b_bufs,
                        empty,
                        ready,
                        total,
                        per_e,
                        num_n,
                        BLOCK_M,
                        BLOCK_N,
                        BLOCK_K,
                        NBUF,
                    ),
                ),
            ],
            [1],
            [24],
        )


def ws_wgrad(a, b, counts_P, BLOCK_M, BLOCK_N, BLOCK_K, NBUF, consumers, num_warps, maxnreg=168, worker_regs=232):
    """out (E, M, N); M must be a multiple of BLOCK_M (the TMA store's box stays inside expert e)."""
    E = counts_P.shape[0]
    M, N = a.shape[1], b.shape[1]
    assert M % BLOCK_M == 0
    offs = torch.zeros(E + 1, dtype=torch.int32, device=a.device)
    offs[1:] = torch.cumsum(counts_P, 0)
    out = a.new_empty(E, M, N)
    lay = gl.NVMMASharedLayout.get_default_for
    a_desc = TensorDescriptor.from_tensor(a, [BLOCK_K, BLOCK_M], lay([BLOCK_K, BLOCK_M], gl.bfloat16))
    b_desc = TensorDescriptor.from_tensor(b, [BLOCK_K, BLOCK_N], lay([BLOCK_K, BLOCK_N], gl.bfloat16))
    out_desc = TensorDescriptor.from_tensor(
        out.view(E * M, N), [BLOCK_M, BLOCK_N], lay([BLOCK_M, BLOCK_N], gl.bfloat16)
    )
    tiles = E * triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N)
    grid = (min(tiles, torch.cuda.get_device_properties(a.device).multi_processor_count),)
    ws_wgrad_kernel[grid](
        a_desc,
        b_desc,
        out_desc,
        offs,
        E,
        M,
        N,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        NBUF,
        consumers,
        worker_regs,
        num_warps=num_warps,
        maxnreg=maxnreg,
    )
    return out


# (BLOCK_M, BLOCK_N, BLOCK_K, ring slots, consumers, warps per consumer)
VARIANTS = [(128, 256, 64, 3, 1, 8), (128, 256, 32, 6, 1, 8), (128, 128, 64, 4, 2, 4), (128, 128, 32, 8, 2, 4)]


def main():
    from moeflow.kernels import autotune, gemm

    torch.manual_seed(0)
    for E, M, N, mean in [(4, 256, 320, 100), (128, 768, 2048, 1024), (128, 2048, 768, 1024)]:
        counts = torch.randint(max(mean - 150, 0), mean + 150, (E,), device="cuda")
        counts[0] = 0  # an empty expert: exact zeros
        counts_P = ((counts + autotune.ROW_ALIGN - 1) // autotune.ROW_ALIGN * autotune.ROW_ALIGN).to(torch.int32)
        P = int(counts_P.sum())
        a, b = (
            torch.randn(P, M, device="cuda", dtype=torch.bfloat16),
            torch.randn(P, N, device="cuda", dtype=torch.bfloat16),
        )
        ref, _ = gemm.wgrad(a, None, b, None, None, None, counts_P, aligned=True)
        flops = 2 * P * M * N
        print(f"## E={E} M={M} N={N} rows={P}", flush=True)
        runs = [("triton wgrad (autotuned)", lambda: gemm.wgrad(a, None, b, None, None, None, counts_P, aligned=True))]
        for v in VARIANTS:
            out = ws_wgrad(a, b, counts_P, *v)
            print(f"  gluon {v}: bit-identical to triton: {torch.equal(out, ref)}", flush=True)
            runs.append((f"gluon {v}", lambda v=v: ws_wgrad(a, b, counts_P, *v)))
        for name, fn in runs:
            ms = triton.testing.do_bench(fn, warmup=20, rep=100, return_mode="median")
            print(f"| {name} | {ms:.3f} ms | {flops / ms / 1e9:.0f} TFLOP/s |", flush=True)
        print(f"  triton's pick: {gemm._wgrad_kernel.best_config}", flush=True)


if __name__ == "__main__":
    main()
