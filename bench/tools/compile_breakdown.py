"""Where the first compiled step's time goes (issue 32): graph breaks and dynamo/inductor phase times.

Builds the `moeflow bench train` shape (a preset, `--layers` blocks) on the GPU with the trainer's
autocast, then (1) `torch._dynamo.explain` of the forward: graph count and each distinct break
reason with its source line; (2) one compiled forward+backward of the whole model, wall time and
`torch._dynamo.utils.compile_times()`; (3) the same with each block compiled on its own
(regional), in a fresh dynamo state. Prints a report; not a benchmark (no claims from it alone).

    python bench/tools/compile_breakdown.py --preset olmoe_1b_7b --layers 4 --tokens 16384
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d) python bench/tools/compile_breakdown.py --scopes "each block"

Run second in one process, a scope finds Inductor's and Triton's caches warm with the kernels the
first compiled (the H200 run of 2026-12-07 did this): compare scopes cold, one process each.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch


def build(preset: str, layers: int, device):
    from hydra import compose, initialize_config_module

    from moeflow.launch.config import model_config
    from moeflow.moe.model import Transformer

    with initialize_config_module(config_module="moeflow.configs", version_base=None):
        cfg = compose(
            config_name="train", overrides=[f"model={preset}", f"model.n_layers={layers}", "gate.renormalize=false"]
        )
    mc = model_config(cfg, device)
    with torch.device(device):
        return Transformer(mc)


def step(fwd, model, tokens):
    from moeflow.launch.losses import lm_loss

    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = lm_loss(fwd(tokens[:, :-1]), tokens[:, 1:]) + model.aux_loss()
    loss.backward()
    torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="olmoe_1b_7b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument(
        "--scopes",
        default="whole model,each block",
        help="comma list of 'whole model' and 'each block'; one per process gives each a cold Inductor cache "
        "(with TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR set to fresh folders)",
    )
    ap.add_argument(
        "--profile-compile",
        type=int,
        default=0,
        metavar="N",
        help="cProfile each compiled first step and print its N costliest Inductor/Triton/dynamo functions "
        "(cumulative): lowering, scheduling, code generation, waiting on the compile workers, benchmarking; "
        "the first-step time printed then includes the profiler's own overhead",
    )
    ap.add_argument("--profile-out", default=None, help="also write each scope's cProfile stats here (pstats format)")
    args = ap.parse_args()
    if args.profile_out and not args.profile_compile:
        ap.error("--profile-out writes the profile of --profile-compile N: pass both")
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = build(args.preset, args.layers, device)
    tokens = torch.randint(0, model.cfg.vocab_size, (args.tokens // args.seq_len, args.seq_len + 1), device=device)

    t = time.perf_counter()
    step(model, model, tokens)
    print(f"eager first step: {time.perf_counter() - t:.1f} s (Triton autotuning included)")

    with torch.autocast("cuda", dtype=torch.bfloat16):
        ex = torch._dynamo.explain(model)(tokens[:, :-1])
    print(f"explain: {ex.graph_count} graphs, {ex.graph_break_count} breaks, {len(ex.ops_per_graph or [])} op lists")
    seen = {}
    for b in ex.break_reasons:
        where = f"{b.user_stack[-1].filename.split('moeflow/')[-1]}:{b.user_stack[-1].lineno}" if b.user_stack else "?"
        key = (b.reason.splitlines()[0][:120], where)
        seen[key] = seen.get(key, 0) + 1
    for (reason, where), n in sorted(seen.items(), key=lambda kv: -kv[1]):
        print(f"  {n:3d} x {where}: {reason}")

    for mode in [m.strip() for m in args.scopes.split(",")]:
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        if mode == "whole model":
            fwd = torch.compile(model)
        else:
            fwd = model
            for block in model.blocks:
                block.compile()
        import torch._inductor.config as inductor_config
        import torch._inductor.metrics as inductor_metrics

        kernels_before = inductor_metrics.generated_kernel_count
        profiler = cProfile.Profile() if args.profile_compile else None
        t = time.perf_counter()
        if profiler:
            profiler.enable()
        step(fwd, model, tokens)
        first = time.perf_counter() - t
        if profiler:
            profiler.disable()
            if args.profile_out:
                profiler.dump_stats(f"{args.profile_out}.{mode.replace(' ', '_')}")
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
            stats.print_stats(r"_inductor|triton|_dynamo|concurrent|subprocess", args.profile_compile)
            print(out.getvalue()[:12000])  # the costliest first
        print(
            f"({mode}) Inductor generated {inductor_metrics.generated_kernel_count - kernels_before} kernels "
            f"with {inductor_config.compile_threads} compile workers"
        )
        t = time.perf_counter()
        step(fwd, model, tokens)
        print(f"compiled ({mode}): first step {first:.1f} s, second {time.perf_counter() - t:.2f} s")
        print(torch._dynamo.utils.compile_times(repr="str", aggregate=True)[:3000])
        if mode == "each block":
            for block in model.blocks:  # back to eager for nothing else: the run ends here
                block._compiled_call_impl = None


if __name__ == "__main__":
    main()
