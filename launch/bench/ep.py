"""`moeflow bench ep`: one MoE layer under expert parallelism vs the same layer on one device.

Run under torchrun, e.g. on a 2-GPU node:
    torchrun --standalone --nproc-per-node 2 -m moeflow.launch.cli bench ep --dispatcher alltoall
One process runs the chosen transport over an EP group of one rank (the same code path).
Weak scaling: every rank keeps `--tokens` tokens. The reference is the whole layer (all
experts, local dispatch) on one device with the same tokens per device, timed on every rank
at the same time, without communication. The EP step is forward+backward through
`parallelize` (FSDP2 + EP on the mesh engine=torch builds, EP over every rank) with `--dispatcher`. Reported per layer and step:
- exchange bytes: rows that leave this rank for other ranks (dispatch and return, forward
  and backward), from the splits of the last step;
- the exchanges replayed alone (NCCL `all_to_all_single` with those splits), their bus
  bandwidth (nccl-tests' convention: algorithm bandwidth x (R-1)/R), and the same bytes in
  one equal-split `all_to_all_single` (the NCCL figure to compare with);
- time exposed (EP step minus the single-device step, at most the exchange time) and hidden
  (the rest of the exchange time);
- host syncs per step: the dispatcher's own split reads plus every synchronising call that
  `torch.cuda.set_sync_debug_mode("warn")` reports during one step (CUDA only).
Small shapes (`--d-model 32 --experts 8 ...`) make it a smoke test on CPU/gloo.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from moeflow.moe.experts import GroupedExperts
from moeflow.moe.gates import build_gate
from moeflow.moe.layer import MoELayer
from moeflow.parallel.dispatchers import DispatchOptions, check_options
from moeflow.parallel.distributed import init_distributed, shutdown_distributed
from moeflow.parallel.exchange import exchange
from moeflow.parallel.mesh import ParallelDims, build_mesh
from moeflow.parallel.parallelize import ShardingOptions, parallelize

from ..config import resolve_experts_impl


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="moeflow bench ep", description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=2048)
    # defaults: the OLMoE-like shape of `moeflow bench train` (64 experts of hidden 1024, top-8)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16384, help="tokens per device")
    p.add_argument(
        "--dispatcher",
        default="alltoall",
        choices=["alltoall", "capacity", "symm_mem"],
        help="parallel.dispatcher for the EP step",
    )
    p.add_argument("--capacity-factor", type=float, default=1.25, help="parallel.capacity_factor (dispatcher=capacity)")
    p.add_argument("--overlap-chunks", type=int, default=1, help="parallel.overlap_chunks for the EP step (alltoall)")
    p.add_argument("--impl", default="auto", help="experts implementation (auto, torch, ...)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", default=None, help="write the result (rank 0) to this file")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also print the N kernels that take the most device time in each step (torch.profiler)",
    )
    return p.parse_args(argv)


class _Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() over iters, all ranks starting together."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _max_over_ranks(v: float, device: torch.device) -> float:
    t = torch.tensor([v], dtype=torch.float64, device=device)  # NCCL reduces device tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _host_syncs_in(fn, device) -> int:
    """Synchronising CUDA calls during fn(), as torch's sync debug mode reports them (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return sum("called a synchronizing CUDA operation" in str(w.message) for w in seen)  # sync debug mode's own words


def _first_host_sync(fn, device) -> str:
    """Where fn() first synchronises with the host: the innermost moeflow frame of the error that
    sync debug mode "error" raises there ("" when nothing synchronises)."""
    import traceback

    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as e:
        frames = [
            f
            for f in traceback.extract_tb(e.__traceback__)
            if "moeflow" in f.filename or "/moe/" in f.filename or "/parallel/" in f.filename
        ]
        where = frames[-1] if frames else traceback.extract_tb(e.__traceback__)[-1]
        return f"{where.filename.rsplit('/', 2)[-2]}/{where.filename.rsplit('/', 1)[-1]}:{where.lineno} ({where.line})"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize(device)
    return ""


def _top_kernels(fn, device, n: int) -> list[tuple[str, float]]:
    """The n kernels with the most device time per call of fn() (milliseconds), over 3 profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        _sync(device)
    rows = [(e.key, e.self_device_time_total / 1e3 / 3) for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[1])[:n]


def _bus_GBps(nbytes: float, ms: float, ranks: int) -> float:
    return nbytes / (ms / 1e3) / 1e9 * (ranks - 1) / ranks if ms > 0 and ranks > 1 else 0.0


def main(argv: list[str]) -> None:
    a = parse(argv)
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    opts = DispatchOptions(name=a.dispatcher, overlap_chunks=a.overlap_chunks, capacity_factor=a.capacity_factor)
    check_options(opts, device_type, ep=int(os.environ.get("WORLD_SIZE", "1")))  # EP over every rank
    env = init_distributed(device_type, single_rank_group=True)
    result, profiles = measure(a, opts, env, device_type)  # its layers, meshes and buffers are gone on return
    if env.is_main:
        report(result, profiles, a)
    shutdown_distributed()


def measure(a: argparse.Namespace, opts: DispatchOptions, env, device_type: str) -> tuple[dict, dict]:
    """The single-device step, the EP step, and the exchanges alone; the result's figures (every rank's)."""
    device = torch.device("cuda", env.local_rank) if device_type == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if (a.dtype == "bf16" or (a.dtype == "auto" and device_type == "cuda")) else torch.float32
    impl = resolve_experts_impl(a.impl, device)
    dims = ParallelDims(world=env.world_size, ep=env.world_size)  # EP over every rank, as engine=torch builds it
    dims.check_model(a.experts, 1, 1)
    mesh = build_mesh(dims, device_type)

    def make_layer():
        torch.manual_seed(0)
        gate = build_gate("topk", a.d_model, a.experts, a.top_k, aux_loss_coef=0.0)
        return MoELayer(gate, GroupedExperts(a.experts, a.d_model, a.d_ff, "swiglu", impl)).to(device, dtype)

    gen = torch.Generator(device=device).manual_seed(1 + env.rank)
    x = torch.randn(a.tokens, a.d_model, device=device, dtype=dtype, generator=gen).requires_grad_()
    grad_y = torch.randn(a.tokens, a.d_model, device=device, dtype=dtype, generator=gen)

    single = make_layer()

    def single_step():
        single(x).backward(grad_y)

    t_single = _max_over_ranks(_time(single_step, device, a.warmup, a.iters), device)

    layer = make_layer()
    ep_model = _Holder(layer)
    parallelize(ep_model, mesh, ShardingOptions(dispatch=opts))  # the production path: FSDP2 + EP

    def ep_step():
        ep_model(x).backward(grad_y)

    t_ep = _max_over_ranks(_time(ep_step, device, a.warmup, a.iters), device)
    own_reads = layer.dispatcher.host_syncs
    ep_step()
    own_reads = layer.dispatcher.host_syncs - own_reads
    synced = int(_max_over_ranks(float(_host_syncs_in(ep_step, device)), device))
    first_sync = _first_host_sync(ep_step, device) if synced and device_type == "cuda" else ""
    profiles = {}
    if a.profile and device_type == "cuda":
        profiles = {
            "single": _top_kernels(single_step, device, a.profile),
            "ep": _top_kernels(ep_step, device, a.profile),
        }

    # Replay the step's exchanges alone: dispatch + return, forward + backward = 4 per chunk.
    in_splits_CR, out_splits_CR = layer.dispatcher.exchange_plan()
    rows_sent = [torch.randn(sum(s), a.d_model, device=device, dtype=dtype) for s in in_splits_CR]
    rows_back = [torch.randn(sum(s), a.d_model, device=device, dtype=dtype) for s in out_splits_CR]
    group = mesh.ep_group

    def exchanges():
        for c in range(len(in_splits_CR)):
            exchange(rows_sent[c], out_splits_CR[c], in_splits_CR[c], group)
            exchange(rows_back[c], in_splits_CR[c], out_splits_CR[c], group)
        for c in range(len(in_splits_CR)):
            exchange(rows_back[c], in_splits_CR[c], out_splits_CR[c], group)
            exchange(rows_sent[c], out_splits_CR[c], in_splits_CR[c], group)

    t_a2a = _max_over_ranks(_time(exchanges, device, a.warmup, a.iters), device)
    row_bytes = a.d_model * torch.finfo(dtype).bits // 8
    R = dims.ep
    total_rows = sum(map(sum, in_splits_CR)) + sum(map(sum, out_splits_CR))  # one forward: out and back
    # the same bytes (4 exchanges' worth) through one equal-split all_to_all_single: NCCL's own figure
    # (every rank the same size: an equal-split exchange of different sizes aborts the process group)
    per_rank = max(1, int(_max_over_ranks(float(2 * total_rows), device)) // R) * R
    flat_in = torch.randn(per_rank, a.d_model, device=device, dtype=dtype)
    flat_out = torch.empty_like(flat_in)
    t_nccl = _max_over_ranks(
        _time(lambda: dist.all_to_all_single(flat_out, flat_in, group=group), device, a.warmup, a.iters), device
    )
    remote_out = sum(s[r] for s in in_splits_CR for r in range(len(s)) if r != mesh.ep_rank) * row_bytes
    remote_in = sum(s[r] for s in out_splits_CR for r in range(len(s)) if r != mesh.ep_rank) * row_bytes
    # bytes this rank sends to other ranks per step (it receives about as many): dispatch and
    # return rows forward, and their gradients backward
    bytes_per_step = 2 * (remote_out + remote_in)
    exposed = min(max(t_ep - t_single, 0.0), t_a2a)
    result = {
        "device": torch.cuda.get_device_name(device) if device_type == "cuda" else "cpu",
        "world": env.world_size,
        "ep": R,
        "dispatcher": a.dispatcher,
        "d_model": a.d_model,
        "d_ff": a.d_ff,
        "experts": a.experts,
        "top_k": a.top_k,
        "tokens_per_rank": a.tokens,
        "dtype": str(dtype).replace("torch.", ""),
        "impl": impl,
        "overlap_chunks": a.overlap_chunks,
        "capacity_factor": a.capacity_factor if a.dispatcher == "capacity" else None,
        "step_ms_single": t_single,
        "step_ms_ep": t_ep,
        "exchange_ms_per_step": t_a2a,
        "exchange_bytes_per_step": bytes_per_step,
        "exchange_bus_GBps": _bus_GBps(2 * total_rows * row_bytes, t_a2a, R),
        "nccl_equal_split_ms": t_nccl,
        "nccl_equal_split_bus_GBps": _bus_GBps(per_rank * row_bytes, t_nccl, R),
        "exposed_ms": exposed,
        "hidden_ms": t_a2a - exposed,
        "host_syncs_dispatcher_per_step": own_reads,
        "host_syncs_cuda_debug_per_step": synced,
        "first_host_sync": first_sync,
        "weak_scaling_efficiency": t_single / t_ep,
    }
    return result, profiles


def report(result: dict, profiles: dict, a: argparse.Namespace) -> None:
    """The figures, as printed lines and one JSON line (and --json)."""
    R, impl = result["ep"], result["impl"]
    t_single, t_ep, t_a2a = result["step_ms_single"], result["step_ms_ep"], result["exchange_ms_per_step"]
    t_nccl, exposed = result["nccl_equal_split_ms"], result["exposed_ms"]
    bytes_per_step, own_reads = result["exchange_bytes_per_step"], result["host_syncs_dispatcher_per_step"]
    synced, first_sync = result["host_syncs_cuda_debug_per_step"], result["first_host_sync"]
    print(
        f"moeflow bench ep: {result['device']}, world {result['world']}, EP={R}, dispatcher {a.dispatcher}, d={a.d_model} f={a.d_ff} E={a.experts} k={a.top_k}, "
        f"{a.tokens} tokens/rank, {result['dtype']}, experts impl {impl}, overlap_chunks {a.overlap_chunks}"
    )
    print(f"  single device step (fwd+bwd): {t_single:9.2f} ms")
    print(f"  EP={R} step (fwd+bwd):        {t_ep:9.2f} ms  ({t_ep / t_single:.3f}x)")
    print(
        f"  exchanges alone per step:     {t_a2a:9.2f} ms  ({bytes_per_step / 2**20:.1f} MiB sent off-rank, bus {result['exchange_bus_GBps']:.1f} GB/s; "
        f"NCCL equal-split all_to_all of the same rows: {t_nccl:.2f} ms, bus {result['nccl_equal_split_bus_GBps']:.1f} GB/s)"
    )
    print(f"  exchange time exposed/hidden: {exposed:9.2f} / {t_a2a - exposed:.2f} ms")
    print(f"  host syncs per step:          {own_reads} by the dispatcher, {synced} reported by CUDA sync debug mode")
    if first_sync:
        print(f"  first synchronising call:     {first_sync}")
    print(f"  weak-scaling efficiency:      {result['weak_scaling_efficiency'] * 100:8.1f} %")
    for name, rows in profiles.items():
        print(
            f"  top kernels, {name} step (ms per step; total of all kernels {sum(ms for _, ms in rows):.2f} in the top {len(rows)}):"
        )
        for kernel, ms in rows:
            print(f"    {ms:7.3f}  {kernel[:110]}")
    print(json.dumps(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
