"""`moeflow bench experts`: expert-MLP implementations vs the dense-GEMM ceiling.

For each case (T, d, f, E, k): T tokens routed by a random softmax top-k router (or a
skewed one: expert 0 gets 4x the mean load). Timed: forward + backward (gradients of x,
router and all expert weights), routing and permutation included, as the median of
`triton.testing.do_bench`. FLOPs counted as 18*T*k*d*f (SwiGLU). The dense ceiling is
one dense SwiGLU MLP (d, f) over T*k rows: the same FLOPs with no routing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn.functional as F

from moeflow.moe.errors import ConfigError

CASES = [(8192, 4096, 14336, 8, 2), (16384, 2048, 1024, 64, 8), (16384, 2048, 768, 128, 8), (16384, 2048, 1408, 64, 6)]
IMPLS = ("triton", "grouped_mm", "torch")
GiB = 2**30


def route(x_TD, w_DE, k: int, skew: bool):
    """Softmax top-k routing (renormalised), as `TopKGate` routes; with `skew`, expert 0 is forced on a 4k/E share of tokens."""
    from moeflow.moe.gates.common import top_k_indices
    from moeflow.moe.routing import RouterOutput

    T, E = x_TD.shape[0], w_DE.shape[1]
    logits = (x_TD @ w_DE).float()
    if skew:
        forced = torch.rand(T, device=x_TD.device, generator=None) < min(1.0, 4 * k / E)
        logits = logits + torch.where(forced[:, None] & (torch.arange(E, device=x_TD.device) == 0), 1e4, 0.0)
    probs = logits.softmax(-1)
    top_i = top_k_indices(probs, k)  # the product gate's top-k (a Triton kernel on the GPU)
    top_v = probs.gather(1, top_i)
    top_v = top_v / top_v.sum(-1, keepdim=True)
    token_A = torch.arange(T, device=x_TD.device).repeat_interleave(k)
    return RouterOutput(
        token_A=token_A,
        expert_A=top_i.reshape(-1),
        weight_A=top_v.reshape(-1),
        num_tokens=T,
        num_experts=E,
        token_sorted=True,
    )


def _measure(fn, warmup: int, rep: int):
    import triton.testing

    fn()  # compile / autotune outside the timing and the memory figure
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    ms = triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    return ms, extra


def _dense_ceiling(A: int, d: int, f: int, dev, warmup: int, rep: int) -> tuple[float, float]:
    """One SwiGLU MLP over the T*k routed rows, no routing: (ms, peak memory) of its forward+backward
    (its tensors are freed on return, before the MoE variants are measured)."""
    xA = torch.randn(A, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(d, f, device=dev, dtype=torch.bfloat16) * d**-0.5).requires_grad_()
    w3 = (torch.randn(d, f, device=dev, dtype=torch.bfloat16) * d**-0.5).requires_grad_()
    w2 = (torch.randn(f, d, device=dev, dtype=torch.bfloat16) * f**-0.5).requires_grad_()
    dyA = torch.randn(A, d, device=dev, dtype=torch.bfloat16)

    def dense():
        y = (F.silu(xA @ w1) * (xA @ w3)) @ w2
        torch.autograd.grad(y, [xA, w1, w3, w2], dyA)

    return _measure(dense, warmup, rep)


def bench_case(T, d, f, E, k, skew, impls, warmup, rep, seed=0):
    from moeflow.moe.dispatch import LocalDispatcher
    from moeflow.moe.experts import GroupedExperts

    dev = torch.device("cuda")
    torch.manual_seed(seed)
    A = T * k
    flops = 18 * A * d * f
    rows = []

    dense_ms, dense_mem = _dense_ceiling(A, d, f, dev, warmup, rep)
    rows.append(("dense ceiling", dense_ms, dense_mem))

    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w_router = (torch.randn(d, E, device=dev, dtype=torch.bfloat16) * d**-0.5).requires_grad_()
    experts = GroupedExperts(E, d, f, "swiglu").to(dev, torch.bfloat16)
    experts.reset_parameters(std=d**-0.5, out_std=f**-0.5)
    params = [x, w_router, experts.w1_EDF, experts.w3_EDF, experts.w2_EFD]
    dy = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    dispatcher = LocalDispatcher()
    names = {"triton": "moeflow triton", "grouped_mm": "torch._grouped_mm (16-row pad)", "torch": "per-expert loop"}
    for impl in impls:
        experts.impl = impl

        def moe():
            y = dispatcher(x, route(x, w_router, k, skew), experts)
            torch.autograd.grad(y, params, dy)

        torch.manual_seed(seed + 1)  # the same skewed routing for every impl
        ms, mem = _measure(moe, warmup, rep)
        rows.append((names[impl], ms, mem))
    return [
        dict(impl=n, ms=ms, tflops=flops / ms / 1e9, x_dense=dense_ms / ms, extra_peak_gib=mem / GiB)
        for n, ms, mem in rows
    ]


def breakdown(T, d, f, E, k, warmup, rep):
    """Median time and TFLOP/s of each kernel of the Triton path (random routing, SwiGLU)."""
    import triton.testing

    from moeflow.kernels import gemm, permute
    from moeflow.kernels.ops import aligned_layout, routing_layout
    from moeflow.moe.routing import plan_dispatch

    dev = torch.device("cuda")
    torch.manual_seed(0)
    A = T * k
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    w_router = torch.randn(d, E, device=dev, dtype=torch.bfloat16) * d**-0.5
    w1, w3 = (torch.randn(E, d, f, device=dev, dtype=torch.bfloat16) * d**-0.5 for _ in range(2))
    w2 = torch.randn(E, f, d, device=dev, dtype=torch.bfloat16) * f**-0.5
    plan = plan_dispatch(route(x, w_router, k, False))
    pos, offs = routing_layout(plan.token_A, T, plan.token_order_A)

    def layout():
        return aligned_layout(plan.counts_E, plan.token_A, plan.weight_A, pos)

    # the same launches as moeflow.kernels.ops (rows copied into the aligned expert order, then contiguous GEMMs)
    counts, tok, weight, pos_P, rows_A = layout()
    P = tok.shape[0]
    x_AD = permute.fan_out(x, offs, rows_A, P, (tok, counts))
    g, h1, h3 = gemm.up(x_AD, None, w1, w3, counts, P, True)
    ys = gemm.down(g, w2, counts, weight, pos_P)
    dy = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    dy_AD = permute.fan_out(dy, offs, rows_A, P, (tok, counts))
    dh1, dh3, g2, _ = gemm.down_bwd(dy_AD, None, w2, h1, h3, weight, counts, True)
    gemm = 2 * A * d * f
    steps = [
        (
            "route+plan+layout",
            lambda: (
                plan_dispatch(route(x, w_router, k, False)),
                routing_layout(plan.token_A, T, plan.token_order_A),
                layout(),
            ),
            0,
        ),
        ("fwd x rows into expert order", lambda: permute.fan_out(x, offs, rows_A, P, (tok, counts)), 0),
        ("fwd up (x@W1,x@W3, SwiGLU)", lambda: gemm.up(x_AD, None, w1, w3, counts, P, True), 2 * gemm),
        ("fwd down (g@W2, scale, scatter)", lambda: gemm.down(g, w2, counts, weight, pos_P), gemm),
        ("fwd segsum (A->T rows)", lambda: permute.segsum(ys, offs, T), 0),
        ("bwd dy rows into expert order", lambda: permute.fan_out(dy, offs, rows_A, P, (tok, counts)), 0),
        ("bwd dG=dy@W2^T GEMM + act bwd", lambda: gemm.down_bwd(dy_AD, None, w2, h1, h3, weight, counts, True), gemm),
        ("bwd dW2 ((w*g)^T@dy)", lambda: gemm.wgrad(g2, None, dy_AD, None, None, None, counts, aligned=True), gemm),
        ("bwd dX (dh1@W1^T+dh3@W3^T, scatter)", lambda: gemm.grad_input(dh1, w1, dh3, w3, counts, pos_P), 2 * gemm),
        ("bwd dW1,dW3 (x^T@dh)", lambda: gemm.wgrad(x_AD, None, dh1, dh3, None, None, counts, aligned=True), 2 * gemm),
        ("bwd segsum (beside dW1,dW3 in a step)", lambda: permute.segsum(ys, offs, T), 0),
    ]
    print(f"## breakdown {(T, d, f, E, k)}: kernel | ms | TFLOP/s")
    total = 0.0
    for name, fn, fl in steps:
        fn()
        ms = triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
        total += ms
        print(f"| {name} | {ms:.3f} | {fl / ms / 1e9:.0f} |" if fl else f"| {name} | {ms:.3f} | - |", flush=True)
    print(f"| sum | {total:.3f} | {18 * A * d * f / total / 1e9:.0f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="moeflow bench experts", description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="all", help="'all' or indices into the case list, e.g. 0,2")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma list of: " + ", ".join(IMPLS))
    p.add_argument("--no-skew", action="store_true", help="skip the skewed-routing variant")
    p.add_argument("--warmup", type=int, default=50, help="do_bench warm-up (ms)")
    p.add_argument("--rep", type=int, default=300, help="do_bench repetition time (ms)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--breakdown", action="store_true", help="also time each Triton kernel on its own")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise ConfigError("needs a CUDA GPU (timings of the Triton kernels mean nothing elsewhere)")
    impls = [i for i in a.impls.split(",") if i]
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        raise ConfigError(f"unknown impl {bad[0]!r}; choose from {', '.join(IMPLS)}")
    cases = CASES if a.cases == "all" else [CASES[int(i)] for i in a.cases.split(",")]
    print(
        f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    for var, meaning in (
        ("MOEFLOW_AUTOTUNE", "every kernel runs its first tile candidate, untuned"),
        ("MOEFLOW_TMA", "TMA loads off"),
    ):
        if os.environ.get(var) == "0":  # easy to inherit from a test run in the same shell
            print(f"# warning: {var}=0 is set: {meaning}; these are not the default path's timings", file=sys.stderr)
            print(f"# {var}=0 ({meaning})")
    out = []
    for case in cases:
        for skew in [False] if a.no_skew else [False, True]:
            rows = bench_case(*case, skew, impls, a.warmup, a.rep)
            label = f"{case}{' skewed' if skew else ''}"
            for r in rows:
                r.update(case=list(case), skew=skew)
                print(
                    f"| {label} | {r['impl']} | {r['ms']:.2f} | {r['tflops']:.0f} | x{r['x_dense']:.2f} | {r['extra_peak_gib']:.2f} |",
                    flush=True,
                )
            out += rows
        if a.breakdown:
            breakdown(*case, a.warmup, a.rep)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
