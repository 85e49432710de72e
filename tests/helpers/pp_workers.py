"""Pipeline parallelism over gloo ranks against one process on the same global batch.

Each worker builds the pipelined model (meta init, this rank's stages, FSDP2 + EP per stage,
torch.distributed.pipelining's schedule) and a single-process reference with the same seed. The
reference runs the same micro-batches one after another (a pipeline's micro-batch k is, across
the data-parallel ranks, the k-th slice of every rank's batch; MoE statistics are per micro-batch,
as under gradient accumulation). Returned: the largest differences of losses, aux losses,
gradients (by parameter name), clip norms and weights after AdamW steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moeflow.moe.model import Transformer
from moeflow.parallel.clip import clip_grad_norm_
from moeflow.parallel.mesh import ParallelDims, build_mesh
from moeflow.parallel.parallelize import ShardingOptions
from moeflow.parallel.pipeline_schedule import build_pipeline
from moeflow.parallel.plan import reduce_replicated_expert_grads

from .fsdp_workers import _maxdiff, model_cfg


def lm_loss(logits, y):
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def equivalence_all(rank: int, world: int, dims: dict, cases: list[tuple], over: dict | None = None) -> dict:
    """`equivalence` for several (gate, schedule[, layers per stage]) cases in one set of processes,
    with model overrides `over` (GQA, q/k norms)."""
    return {
        "/".join(map(str, case)): equivalence(
            rank, world, dims, case[0], case[1], layers=case[2] if len(case) > 2 else None, over=over
        )
        for case in cases
    }


def equivalence(
    rank: int,
    world: int,
    dims: dict,
    gate: str,
    schedule: str,
    microbatches: int = 4,
    steps: int = 2,
    n_layers: int = 4,
    layers=None,
    over: dict | None = None,
) -> dict:
    torch.manual_seed(0)
    mc = model_cfg(gate, **{"n_layers": n_layers, **(over or {})})
    ref = Transformer(mc)
    torch.manual_seed(0)
    with torch.device("meta"):
        full = Transformer(mc)
    pdims = ParallelDims(world=world, **dims)
    mesh = build_mesh(pdims, "cpu")
    pipe = build_pipeline(
        full, mesh, ShardingOptions(), schedule, microbatches, layers, torch.device("cpu"), lm_loss, (2, 8 // pdims.cp)
    )
    par = pipe.model
    refs = dict(ref.named_parameters())
    out = {"init": max(_maxdiff(p, refs[n]) for n, p in par.named_parameters())}
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt_par = torch.optim.AdamW(par.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    dp = pdims.dp
    data_rank = (rank % pdims.stage_world) // (pdims.tp * pdims.cp)
    B = 2 * microbatches  # sequences per data-parallel rank
    out.update(loss=0.0, aux=0.0, grad=0.0, norm=0.0, weights=0.0)
    for step in range(steps):
        for m in (ref, par):
            for layer in m.moe_layers():
                layer.gate.set_step(step)
        tokens = torch.randint(0, mc.vocab_size, (B * dp, 9), generator=gen)
        per_rank = tokens.chunk(dp)
        ref_loss = ref_aux = 0.0
        for k in range(microbatches):  # the pipeline's micro-batch k: every data-parallel rank's k-th slice
            mb = torch.cat([t.chunk(microbatches)[k] for t in per_rank])
            loss = lm_loss(ref(mb[:, :-1]), mb[:, 1:])
            aux = ref.aux_loss()
            ((loss + aux) / microbatches).backward()
            ref_loss += loss.item() / microbatches
            ref_aux += aux.item() / microbatches
        mine = per_rank[data_rank]
        x, y = mine[:, :-1], mine[:, 1:]
        if pipe.plan.sequence_shard is not None:  # parallel.cp: this rank's shard of every sequence
            x, y = pipe.plan.sequence_shard.shard(x), pipe.plan.sequence_shard.shard(y)
        loss, aux = pipe.step(x, y, 1.0 / pdims.grad_ranks)
        reduce_replicated_expert_grads(pipe.plan)
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        global_aux = aux.detach().clone()
        dist.all_reduce(global_aux)
        out["loss"] = max(out["loss"], abs(global_loss.item() / world - ref_loss))
        out["aux"] = max(out["aux"], abs(global_aux.item() / world - ref_aux))
        for n, p in par.named_parameters():
            if refs[n].grad is not None:
                d = _maxdiff(p.grad, refs[n].grad) if p.grad is not None else float("inf")
                if d > out["grad"]:
                    out["grad"], out["worst_grad"] = d, n
        n_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        n_par = clip_grad_norm_(list(par.parameters()), 0.5, world=pipe.plan.world)
        out["norm"] = max(out["norm"], abs(n_ref.item() - n_par.item()))
        opt_ref.step(), opt_par.step()
        opt_ref.zero_grad(), opt_par.zero_grad()
    out["weights"] = max(_maxdiff(p, refs[n]) for n, p in par.named_parameters())
    out["ref_norm"], out["ref_aux"] = n_ref.item(), ref_aux
    out["split"] = pipe.split
    return out
