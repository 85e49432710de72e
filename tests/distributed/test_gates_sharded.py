"""A batch sharded over a token group routes exactly like the same batch on one process.

Two gloo ranks each route half of the tokens with `gate.token_group` set; their
assignments (shifted to global token ids), aux losses and statistics must equal the
single-process routing of the whole batch.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers.timeouts import limit
from moeflow.moe.gates import build_gate
from moeflow.moe.gates.base import SequenceShape

D, E, T = 16, 8, 96
CASES = {
    "topk-capacity-score": (
        "topk",
        2,
        {"dropless": False, "capacity_factor": 1.0, "z_loss_coef": 1e-3, "seq_aux_loss_coef": 1e-2},
    ),
    "topk-capacity-position": ("topk", 2, {"dropless": False, "capacity_factor": 0.75, "drop_policy": "position"}),
    "topk-bias": ("topk", 2, {"score_func": "sigmoid", "bias_update_rate": 0.01}),
    "expert_choice": ("expert_choice", 2, {}),
    "sinkhorn": ("sinkhorn", 2, {}),
    "ssr": ("ssr", 2, {"step_fraction": 1.0, "token_fraction": 0.5}),
    "dts": ("dts", 2, {"gumbel_noise": False, "anneal_steps": 10}),
}


def make(case):
    name, k, opts = CASES[case]
    torch.manual_seed(0)
    gate = build_gate(name, D, E, k, **opts).train()
    with torch.no_grad():
        gate.proj.weight.normal_(std=0.5)
    gate.sequence_shape = SequenceShape(seq_len=8)
    gate.set_step(3)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    x[T // 2 + 3] = x[2]  # a tie across the shard boundary
    return gate, x


def summary(out, offset, gate):
    order = torch.argsort((out.token_A + offset) * E + out.expert_A)
    s = {"token": out.token_A[order] + offset, "expert": out.expert_A[order], "weight": out.weight_A[order].detach()}
    s.update({f"loss/{k}": v.detach() for k, v in out.losses.items()})
    s.update({f"stat/{k}": v for k, v in out.stats.items() if k != "transported_fraction"})
    if hasattr(gate, "load_accum_E"):
        s["load_accum_E"] = gate.load_accum_E.clone()
    return s


def _worker(rank, world, out_dir):
    torch.set_num_threads(1)
    # file rendezvous: no TCP port to race for with other jobs on the machine
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out_dir}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        results = {}
        for case in CASES:
            gate, x = make(case)
            gate.token_group = dist.group.WORLD
            n = T // world
            results[case] = summary(gate(x[rank * n : (rank + 1) * n]), rank * n, gate)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # leave together: tearing gloo down while a peer still talks aborts the process
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.timeout(limit(180))
def test_sharded_batch_routes_like_the_global_batch(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path)), nprocs=world, join=True)
    shards = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case in CASES:
        gate, x = make(case)
        ref = summary(gate(x), 0, gate)
        parts = [s[case] for s in shards]
        for key in ("token", "expert", "weight"):
            got = torch.cat([p[key] for p in parts])
            torch.testing.assert_close(got, ref[key], msg=f"{case}: {key} differs")
        for key, want in ref.items():
            if key in ("token", "expert", "weight"):
                continue
            for p in parts:  # reduced values are the same on every rank
                torch.testing.assert_close(
                    p[key].float(), want.float(), rtol=1e-5, atol=1e-6, msg=f"{case}: {key} differs"
                )
