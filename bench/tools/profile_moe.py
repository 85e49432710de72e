"""Where one fwd+bwd of the Triton MoE path spends GPU time (torch.profiler), for one bench case.

    python bench/tools/profile_moe.py [case index] [k top rows]

Prints every CUDA kernel grouped by name (total ms, calls) and the GPU-busy vs wall time of
one step, so routing, sorting and launch gaps show next to the GEMMs.
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from moeflow.launch.bench.experts import CASES, route
from moeflow.moe.dispatch import LocalDispatcher
from moeflow.moe.experts import GroupedExperts


def main() -> None:
    T, d, f, E, k = CASES[int(sys.argv[1]) if len(sys.argv) > 1 else 1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w_router = (torch.randn(d, E, device=dev, dtype=torch.bfloat16) * d**-0.5).requires_grad_()
    experts = GroupedExperts(E, d, f, "swiglu", impl="triton").to(dev, torch.bfloat16)
    experts.reset_parameters(std=d**-0.5, out_std=f**-0.5)
    params = [x, w_router, experts.w1_EDF, experts.w3_EDF, experts.w2_EFD]
    dy = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    dispatcher = LocalDispatcher()

    def step():
        y = dispatcher(x, route(x, w_router, k, False), experts)
        torch.autograd.grad(y, params, dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        step()
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end) / 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    rows = {}
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        name = ev.name[:90]
        t, n = rows.get(name, (0.0, 0))
        rows[name] = (t + ev.device_time / 1e3 / 5, n + 1)
    busy = sum(t for t, _ in rows.values())
    print(
        f"## profile case {(T, d, f, E, k)}: wall {wall:.3f} ms/step, GPU busy {busy:.3f} ms/step, {sum(n for _, n in rows.values()) / 5:.0f} kernels/step"
    )
    for name, (t, n) in sorted(rows.items(), key=lambda r: -r[1][0])[:top]:
        print(f"| {t:7.3f} ms | {n / 5:4.0f}x | {name}")


if __name__ == "__main__":
    main()
