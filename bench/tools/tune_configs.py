"""Time each grouped-GEMM use with forced tile configs (the autotune list replaced by one
candidate), next to cuBLAS on the same per-expert shapes (torch.bmm over equal groups), to see
which configs the autotune lists should hold. Development tool; one line per (use, config).

    python bench/tools/tune_configs.py [case index ...]      (env USES=up,dW13,... to pick uses (default: the six of a step),
                                                          LIMIT=n the first n shapes, PERSIST=0/1 one launch kind)
"""

import os
import sys

import torch
import triton
import triton.testing

from moeflow.kernels import autotune, gemm, permute, tma
from moeflow.kernels.ops import aligned_layout, routing_layout
from moeflow.launch.bench.experts import CASES, route
from moeflow.moe.routing import plan_dispatch

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), each one-program-per-tile and persistent (PERSIST=0 / 1 / both)
_PERSIST = {"0": (False,), "1": (True,)}.get(os.environ.get("PERSIST", ""), (False, True))
LIMIT = int(os.environ.get("LIMIT", "0"))  # first LIMIT shapes of each list (0: all)


def _both(shapes):
    return [(*shape, p) for shape in shapes[: LIMIT or None] for p in _PERSIST]


UP = _both(
    [
        (128, 128, 64, 8, 3),
        (128, 128, 64, 8, 4),
        (128, 128, 32, 8, 6),
        (64, 128, 64, 4, 4),
        (64, 256, 64, 8, 4),
        (256, 64, 64, 8, 4),
    ]
)
GMM = _both(
    [
        (128, 256, 64, 8, 3),
        (128, 256, 64, 8, 4),
        (256, 128, 64, 8, 3),
        (256, 128, 64, 8, 4),
        (128, 128, 64, 8, 4),
        (128, 256, 32, 8, 6),
        (128, 128, 64, 4, 4),
        (64, 256, 64, 4, 4),
    ]
)
WGRAD = _both(
    [
        (128, 128, 64, 8, 4),
        (128, 128, 64, 8, 5),
        (128, 128, 64, 8, 6),
        (128, 128, 32, 8, 6),
        (128, 128, 32, 8, 8),
        (256, 128, 32, 8, 6),
        (256, 128, 64, 8, 4),
        (128, 256, 64, 8, 4),
    ]
)


def bench(fn):
    try:
        fn()
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    except Exception as e:  # out of shared memory etc.: report and go on
        print(f"   ({type(e).__name__}: {str(e)[:80]})")
        return float("nan")


def sweep(name, kernel, configs, fn, flops):
    saved = kernel.configs
    two = name.startswith("dW13")  # two B tiles and accumulators
    try:
        for cfg in configs:
            if not autotune.fits_one(
                *cfg[:3], cfg[4], two, cfg[5] and kernel is gemm._gmm_kernel
            ):  # pruned from autotuning anyway
                continue
            autotune.force_tiles(kernel, cfg)
            ms = bench(fn)
            print(
                f"| {name} | {'x'.join(map(str, cfg[:3]))} w{cfg[3]} s{cfg[4]}{' persistent' if cfg[5] else ''} | {ms:.3f} ms | {flops / ms / 1e9:.0f} TFLOP/s |",
                flush=True,
            )
    finally:
        kernel.configs = saved
        kernel.cache.clear()


def main():
    dev = torch.device("cuda")
    uses = set(os.environ.get("USES", "up,down,dG,dX,dW13,dW2").split(","))
    for ci in [int(c) for c in sys.argv[1:]] or [0, 1]:
        T, D, F, E, k = CASES[ci]
        A = T * k
        torch.manual_seed(0)
        bf = dict(device=dev, dtype=torch.bfloat16)
        x = torch.randn(T, D, **bf)
        plan = plan_dispatch(route(x, torch.randn(D, E, **bf) * D**-0.5, k, False))
        counts, tok = plan.counts_E.to(torch.int32), plan.token_A.to(torch.int32)
        pos, offs = routing_layout(plan.token_A, T, plan.token_order_A)
        dh1, dh3, g = (torch.randn(A, F, **bf) for _ in range(3))
        dy = torch.randn(T, D, **bf)
        w1, w3 = torch.randn(E, D, F, **bf), torch.randn(E, D, F, **bf)
        w2 = torch.randn(E, F, D, **bf)
        gemm = 2 * A * D * F
        # cuBLAS on the same per-expert shapes, equal groups of A/E rows
        xe, he = torch.randn(E, A // E, D, **bf), torch.randn(E, A // E, F, **bf)
        for label, fn in (
            ("x^T@dh (one of dW1/dW3)", lambda: torch.bmm(xe.transpose(1, 2), he)),
            ("dh@W1^T", lambda: torch.bmm(he, w1.transpose(1, 2))),
            ("x@W1", lambda: torch.bmm(xe, w1)),
        ):
            t = triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
            print(
                f"## case {CASES[ci]}: cuBLAS bmm {label} per expert: {t:.3f} ms, {gemm / t / 1e9:.0f} TFLOP/s",
                flush=True,
            )
        # rows in the aligned expert order (groups padded to ROW_ALIGN rows), as kernels/ops.py lays them out
        cP, tP, wP, pP, rows_P = aligned_layout(counts, tok, plan.weight_A, pos)
        P = tP.shape[0]
        out_PF, out_PD = torch.empty(P, F, **bf), torch.empty(P, D, **bf)
        x_PD, dy_PD = (permute.fan_out(t, offs, rows_P, P, (tP, cP)) for t in (x, dy))
        x_AD, dy_AD = x[plan.token_A], dy[plan.token_A]
        dh1_P, dh3_P, g_P = (torch.randn(P, F, **bf) for _ in range(3))
        table = {
            "up": (gemm._up_kernel, UP, lambda: gemm.up(x_PD, None, w1, w3, cP, P, True), 2 * gemm),
            "down": (gemm._gmm_kernel, GMM, lambda: gemm.down(g_P, w2, cP, wP, pP, out_rows=A), gemm),
            "dG": (
                gemm._gmm_kernel,
                GMM,
                lambda: gemm._launch_gmm(dy_PD, w2, None, None, out_PF, None, None, cP, P, F, D, True),
                gemm,
            ),
            "dX": (
                gemm._gmm_kernel,
                GMM,
                lambda: gemm._launch_gmm(dh1_P, w1, dh3_P, w3, out_PD, None, pP, cP, P, D, F, True),
                2 * gemm,
            ),
            "dW13": (
                gemm._wgrad_kernel,
                WGRAD,
                lambda: gemm.wgrad(x_PD, None, dh1_P, dh3_P, None, None, cP, aligned=True),
                2 * gemm,
            ),
            "dW2": (
                gemm._wgrad_kernel,
                WGRAD,
                lambda: gemm.wgrad(g_P, None, dy_PD, None, None, None, cP, aligned=True),
                gemm,
            ),
            # the same on unpadded rows in expert order (the layout below ALIGN_FROM_ROWS_PER_EXPERT): one operand masked
            "dW13_unaligned": (
                gemm._wgrad_kernel,
                WGRAD,
                lambda: gemm.wgrad(x_AD, None, dh1, dh3, None, None, counts),
                2 * gemm,
            ),
            "dW2_unaligned": (
                gemm._wgrad_kernel,
                WGRAD,
                lambda: gemm.wgrad(g, None, dy_AD, None, None, None, counts),
                gemm,
            ),
            # the same GEMMs reading rows through token indices inside the loads (gather_rows=True)
            "up_gather": (gemm._up_kernel, UP[:2], lambda: gemm.up(x, tok, w1, w3, counts, A, True), 2 * gemm),
            "dW13_gather": (
                gemm._wgrad_kernel,
                WGRAD[:2],
                lambda: gemm.wgrad(x, tok, dh1, dh3, None, None, counts),
                2 * gemm,
            ),
            "dW2_gather": (
                gemm._wgrad_kernel,
                WGRAD[:3],
                lambda: gemm.wgrad(g, None, dy, None, tok, None, counts),
                gemm,
            ),
        }
        print(f"## case {CASES[ci]}: TMA {'on' if tma.USE_TMA else 'off'}", flush=True)
        for name, (kernel, configs, fn, flops) in table.items():
            if name in uses:
                sweep(name, kernel, configs, fn, flops)


if __name__ == "__main__":
    main()
