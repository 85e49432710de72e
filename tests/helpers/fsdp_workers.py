"""Multi-process workers for the distributed-core tests: FSDP2 + expert parallelism on one mesh.

Each worker builds the parallel model on the meta device, parallelises and materialises it,
and a single-process reference (same seed) that sees the whole global batch; it returns the
largest differences (initial weights, losses, gradients, clip norms, weights after AdamW
steps) for the test process to assert on. Launched with `helpers.ep_workers.spawn`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeflow.moe.model import ModelConfig, Transformer
from moeflow.parallel.clip import clip_grad_norm_
from moeflow.parallel.mesh import ParallelDims, build_mesh
from moeflow.parallel.parallelize import ShardingOptions, materialize, parallelize
from moeflow.parallel.plan import reduce_replicated_expert_grads

GATES = {
    "topk": {"name": "topk", "aux_loss_coef": 0.01},
    "topk_capacity": {"name": "topk", "dropless": False, "capacity_factor": 1.0, "aux_loss_coef": 0.01},
    "sinkhorn": {"name": "sinkhorn"},
    "dts": {"name": "dts", "gumbel_noise": False, "anneal_steps": 10},
    "expert_choice": {"name": "expert_choice"},
    "hash": {"name": "hash"},
    "deepseek_v3": {
        "name": "topk",
        "score_func": "sigmoid",
        "bias_update_rate": 0.01,
        "n_groups": 2,
        "topk_groups": 1,
        "aux_loss_coef": 0.0,
    },
}


# gates some tests use beyond GATES (which every mesh test runs in full)
MORE_GATES = {"topk_seq_aux": {"name": "topk", "aux_loss_coef": 0.01, "seq_aux_loss_coef": 0.01}}


def model_cfg(gate: str, **over) -> ModelConfig:
    base = dict(
        vocab_size=64,
        d_model=16,
        n_layers=2,
        n_heads=2,
        d_ff=24,
        num_experts=4,
        top_k=2,
        max_seq_len=16,
        gate=dict(GATES.get(gate) or MORE_GATES[gate]),
        shared_experts=0,
    )
    base.update(over)
    return ModelConfig(**base)


def _full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _maxdiff(a, b) -> float:
    a, b = _full(a).double(), _full(b).double()
    return (a - b).abs().max().item() if a.numel() else 0.0


def _loss(model, tokens, scale: float, sequence_shard=None):
    x, y = tokens[:, :-1], tokens[:, 1:]
    if sequence_shard is not None:  # context parallelism: this rank's shard of every sequence, as the engine feeds it
        x, y = sequence_shard.shard(x), sequence_shard.shard(y)
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    return loss, (loss + model.aux_loss()) * scale


def equivalence_all(rank: int, world: int, dims: dict, gates: list[str], steps: int = 2, ac: str = "none") -> dict:
    """`equivalence` for several gates in one set of processes (process start-up is the expensive part)."""
    return {g: equivalence(rank, world, dims, g, steps, ac) for g in gates}


def equivalence_over(rank: int, world: int, dims: dict, gates: list[str], over: dict, steps: int = 2) -> dict:
    """`equivalence` for several gates with model overrides `over` (e.g. GQA, q/k norms)."""
    return {g: equivalence(rank, world, dims, g, steps, "none", over) for g in gates}


def equivalence(
    rank: int, world: int, dims: dict, gate: str, steps: int = 2, ac: str = "none", over: dict | None = None
) -> dict:
    """Parallel (meta init, FSDP2, EP) vs single process on the global batch, over `steps` AdamW steps."""
    from moeflow.parallel.activation_checkpointing import apply_activation_checkpointing

    torch.manual_seed(0)
    mc = model_cfg(gate, **(over or {}))
    ref = Transformer(mc)  # the single-process reference, as engine=torch builds it in one process
    torch.manual_seed(0)
    with torch.device("meta"):
        par = Transformer(mc)
    pdims = ParallelDims(world=world, **dims)
    pdims.check_model(mc.num_experts, mc.n_heads, mc.kv_heads)
    mesh = build_mesh(pdims, "cpu")
    apply_activation_checkpointing(par, ac)
    plan = parallelize(par, mesh, ShardingOptions())
    materialize(par, torch.device("cpu"))
    out = {"init": max(_maxdiff(a, b) for a, b in zip(par.state_dict().values(), ref.state_dict().values()))}

    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt_par = torch.optim.AdamW(par.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    B = 2 * pdims.dp  # two sequences per data-parallel rank
    out.update(loss=0.0, grad=0.0, norm=0.0, weights=0.0)
    for step in range(steps):
        for m in (ref, par):
            for layer in m.moe_layers():
                layer.gate.set_step(step)
        tokens = torch.randint(0, mc.vocab_size, (B, 9), generator=gen)
        mine = tokens.chunk(pdims.dp)[rank // (pdims.tp * pdims.cp)]  # a CP group reads one batch
        ref_loss, ref_obj = _loss(ref, tokens, 1.0)
        ref_obj.backward()
        par_loss, par_obj = _loss(par, mine, 1.0 / pdims.grad_ranks, plan.sequence_shard)
        par_obj.backward()
        reduce_replicated_expert_grads(plan)
        global_loss = par_loss.detach().clone()
        dist.all_reduce(global_loss)
        out["loss"] = max(out["loss"], abs(global_loss.item() / world - ref_loss.item()))
        names = [n for n, _ in ref.named_parameters()]
        for (n, p_par), p_ref in zip(par.named_parameters(), ref.parameters()):
            assert n in names
            if p_ref.grad is not None:
                d = _maxdiff(p_par.grad, p_ref.grad)
                if d > out["grad"]:
                    out["grad"], out["worst_grad"] = d, n
        n_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        n_par = clip_grad_norm_(list(par.parameters()), 0.5)
        out["norm"] = max(out["norm"], abs(n_ref.item() - n_par.item()))
        opt_ref.step(), opt_par.step()
        opt_ref.zero_grad(), opt_par.zero_grad()
    out["weights"] = max(_maxdiff(a, b) for a, b in zip(par.state_dict().values(), ref.state_dict().values()))
    out["ref_norm"] = n_ref.item()
    return out


def state_bytes(rank: int, world: int, dims: dict, preset: dict) -> dict:
    """Bytes of parameters, gradients and AdamW moments this rank holds after one step, summed over
    the live local tensors (DTensor shards: their local part)."""
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    mc = ModelConfig(**preset)
    with torch.device("meta"):
        model = Transformer(mc)
    pdims = ParallelDims(world=world, **dims)
    plan = parallelize(model, build_mesh(pdims, "cpu"), ShardingOptions())
    materialize(model, torch.device("cpu"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, mc.vocab_size, (1, 9), generator=torch.Generator().manual_seed(rank))
    _, obj = _loss(model, tokens, 1.0 / pdims.dp)
    obj.backward()
    reduce_replicated_expert_grads(plan)
    opt.step()

    def nbytes(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    params = sum(nbytes(p) for p in model.parameters())
    grads = sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None)
    moments = sum(nbytes(v) for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))
    return {"params": params, "grads": grads, "optimizer": moments, "total_params": model.num_params()}


def backward_exchanges(rank: int, world: int, modes: list[str]) -> dict:
    """How many `moeflow::all_to_all` exchanges one backward runs, per activation-checkpointing mode
    (EP over `world` ranks, 2 MoE blocks): recomputed exchanges show up as extra calls."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from moeflow.parallel.activation_checkpointing import apply_activation_checkpointing

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith("moeflow.all_to_all"):
                self.n += 1
            return func(*args, **(kwargs or {}))

    out = {}
    for mode in modes:
        torch.manual_seed(0)
        mc = model_cfg("topk")
        with torch.device("meta"):
            model = Transformer(mc)
        apply_activation_checkpointing(model, mode)
        parallelize(model, build_mesh(ParallelDims(world=world, dp_shard=world, ep=world), "cpu"), ShardingOptions())
        materialize(model, torch.device("cpu"))
        tokens = torch.randint(0, mc.vocab_size, (2, 9), generator=torch.Generator().manual_seed(rank))
        loss, scaled = _loss(model, tokens, 1.0)
        counter = Count()
        with counter:
            scaled.backward()
        out[mode] = counter.n
    return out
