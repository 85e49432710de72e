"""Time the grouped-GEMM kernels with forced tile configs (no autotune), next to cuBLAS on the
same per-expert shapes (torch.bmm over equal groups), to see which configs the autotune lists
should hold. Development tool; one line per (kernel, config).

    python kernels/tune_configs.py [case index ...]
"""
import sys

import torch
import triton
import triton.testing

from moeflow.kernels import grouped_gemm as gg
from moeflow.kernels.benchmark import CASES, route
from moeflow.kernels.ops import routing_layout
from moeflow.moe.dispatch import plan_dispatch

WGRAD = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 8, 5), (128, 128, 32, 8, 6), (128, 128, 128, 8, 3),
         (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (64, 128, 64, 4, 5), (128, 64, 64, 4, 5)]
GMM = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 4), (128, 128, 64, 8, 5), (128, 128, 128, 8, 3),
       (64, 256, 64, 8, 4), (256, 128, 64, 8, 3), (128, 64, 64, 4, 5)]


def jit(k):
    while type(k).__name__ not in ("JITFunction", "InterpretedFunction"):
        k = k.fn
    return k


def bench(fn):
    try:
        fn()
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    except Exception as e:  # out of shared memory etc.: report and go on
        print(f"   ({type(e).__name__}: {str(e)[:80]})")
        return float("nan")


def main():
    dev = torch.device("cuda")
    for ci in [int(c) for c in sys.argv[1:]] or [0, 1]:
        T, D, F, E, k = CASES[ci]
        A = T * k
        torch.manual_seed(0)
        x = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
        plan = plan_dispatch(route(x, torch.randn(D, E, device=dev, dtype=torch.bfloat16) * D**-0.5, k, False))
        counts, tok = plan.counts_E.to(torch.int32), plan.token_A.to(torch.int32)
        pos, _ = routing_layout(plan.token_A, T, plan.token_order_A)
        dh1, dh3, gw = (torch.randn(A, F, device=dev, dtype=torch.bfloat16) for _ in range(3))
        dy = torch.randn(T, D, device=dev, dtype=torch.bfloat16)
        w1 = torch.randn(E, D, F, device=dev, dtype=torch.bfloat16)
        w2 = torch.randn(E, F, D, device=dev, dtype=torch.bfloat16)  # dG = dy[tok] @ W2^T reads it K-contiguous
        gemm = 2 * A * D * F
        # cuBLAS on the same per-expert shapes, equal groups of A/E rows
        xe = torch.randn(E, A // E, D, device=dev, dtype=torch.bfloat16)
        he = torch.randn(E, A // E, F, device=dev, dtype=torch.bfloat16)
        t = triton.testing.do_bench(lambda: torch.bmm(xe.transpose(1, 2), he), warmup=10, rep=40, return_mode="median")
        print(f"## case {CASES[ci]}: cuBLAS bmm x^T@dh per expert (one of dW1/dW3): {t:.3f} ms, {gemm / t / 1e9:.0f} TFLOP/s", flush=True)
        t = triton.testing.do_bench(lambda: torch.bmm(he, w1.transpose(1, 2)), warmup=10, rep=40, return_mode="median")
        print(f"## case {CASES[ci]}: cuBLAS bmm dh@W1^T per expert: {t:.3f} ms, {gemm / t / 1e9:.0f} TFLOP/s", flush=True)
        wk = jit(gg._wgrad_kernel)
        for bm, bn, bk, w, s in WGRAD:
            for two in (True, False):
                o1 = torch.empty(E, D, F, device=dev, dtype=torch.bfloat16)
                o2 = torch.empty_like(o1)
                grid = (E * triton.cdiv(D, bm) * triton.cdiv(F, bn),)

                def run():
                    wk[grid](x, tok, dh1, dh3, counts, counts, o1, o2, counts, E, D, F, 1 << 20,
                             x.stride(0), x.stride(1), dh1.stride(0), dh1.stride(1),
                             A_GATHER=True, B_GATHER=False, HAS_SCALE=False, TWO=two, E_POW2=gg._e_pow2(E),
                             BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s)
                ms = bench(run)
                fl = gemm * (2 if two else 1)
                print(f"| wgrad dW13 {'TWO' if two else 'one'} | {bm}x{bn}x{bk} w{w} s{s} | {ms:.3f} ms | {fl / ms / 1e9:.0f} TFLOP/s |", flush=True)
            o = torch.empty(E, F, D, device=dev, dtype=torch.bfloat16)
            grid = (E * triton.cdiv(F, bm) * triton.cdiv(D, bn),)
            ms = bench(lambda: wk[grid](gw, counts, dy, dy, tok, counts, o, o, counts, E, F, D, 1 << 20,
                                        gw.stride(0), gw.stride(1), dy.stride(0), dy.stride(1),
                                        A_GATHER=False, B_GATHER=True, HAS_SCALE=False, TWO=False, E_POW2=gg._e_pow2(E),
                                        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=s))
            print(f"| wgrad dW2 | {bm}x{bn}x{bk} w{w} s{s} | {ms:.3f} ms | {gemm / ms / 1e9:.0f} TFLOP/s |", flush=True)
        gk = jit(gg._gmm_kernel)

        def time_gmm(a, b, out, gather, scatter, N, K, b_strides, two, cfg):
            bm, bn, bk, w, s = cfg
            grid = ((triton.cdiv(A, bm) + E) * triton.cdiv(N, bn),)
            return bench(lambda: gk[grid](a, b, a, b, out, counts, gather if gather is not None else counts,
                                          scatter if scatter is not None else counts, counts, E, N, K, A, 1 << 20,
                                          a.stride(0), a.stride(1), *b_strides, out.stride(0),
                                          TWO=two, HAS_SCALE=False, HAS_GATHER=gather is not None, HAS_SCATTER=scatter is not None,
                                          E_POW2=gg._e_pow2(E), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EVEN_K=K % bk == 0,
                                          num_warps=w, num_stages=s))

        for cfg in GMM:
            bm, bn, bk, w, s = cfg
            # dX = dh1 @ W1^T + dh3 @ W3^T (timed with dh1/W1 twice: the same work), scattered
            ms = time_gmm(dh1, w1, torch.empty(A, D, device=dev, dtype=torch.bfloat16), None, pos, D, F,
                          (w1.stride(0), w1.stride(2), w1.stride(1)), True, cfg)
            print(f"| gmm dX (TWO, scatter) | {bm}x{bn}x{bk} w{w} s{s} | {ms:.3f} ms | {2 * gemm / ms / 1e9:.0f} TFLOP/s |", flush=True)
            ms = time_gmm(dy, w2, torch.empty(A, F, device=dev, dtype=torch.bfloat16), tok, None, F, D,
                          (w2.stride(0), w2.stride(2), w2.stride(1)), False, cfg)
            print(f"| gmm dG (gather) | {bm}x{bn}x{bk} w{w} s{s} | {ms:.3f} ms | {gemm / ms / 1e9:.0f} TFLOP/s |", flush=True)

if __name__ == "__main__":
    main()
