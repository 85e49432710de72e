"""Multi-process workers: moeflow's MoE layer inside megatron-core under expert parallelism.

Each rank initialises megatron-core's parallel_state (gloo, CPU) with an EP size, builds a
GPTModel through moeflow's layer spec (`build_gpt_model`: the MoE slot is `MoeflowMoE`,
which shards its experts over parallel_state's expert group), loads the same full weights
on every rank (sliced to its experts like the training loop does), runs the MoE slot on
this rank's part of the global batch and compares it with one moeflow `MoELayer` holding
the full weights on the whole batch (float64). Gradients are synchronised by megatron-core's
own `DistributedDataParallel` (`megatron_core.megatron_ddp`, what engine=megatron uses), which
must put the params `MoeflowMoE` marks `allreduce=False` into its expert buffers (reduced over
the expert-data-parallel group). Its grad buffers are allocated with `torch.cuda.current_device()`;
on CPU the worker points that at "cpu" (nothing else in its all-reduce path needs CUDA). Which
tensors are shards comes from `megatron_core.megatron_plan`, read from megatron's attributes.

GPTModel's own forward (attention, rotary) needs CUDA, so only the MoE slot runs here.
"""

from __future__ import annotations

import torch
from torch import nn

from helpers.ep_workers import _maxdiff
from moeflow.moe.model import ModelConfig, Transformer, build_moe_layer
from moeflow.moe.state import unique_state_dict
from moeflow.parallel.clip import clip_grad_norm_
from moeflow.parallel.plan import is_expert
from moeflow.parallel.routing_stats import sync_routing_stats

D, F_, E, K, S, B = 16, 24, 4, 2, 3, 2  # tokens: S x B per rank


def model_config(gate: dict) -> ModelConfig:
    return ModelConfig(
        vocab_size=32,
        d_model=D,
        n_layers=1,
        n_heads=2,
        max_seq_len=8,
        d_ff=F_,
        num_experts=E,
        top_k=K,
        shared_experts=1,
        gate=gate,
    )


def full_state(mc: ModelConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Transformer(mc)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return unique_state_dict(model)


class SlotOnly(nn.Module):
    """The MoE slot of a GPTModel, forwarded alone (GPTModel's forward needs CUDA)."""

    def __init__(self, slot):
        super().__init__()
        self.slot = slot

    def forward(self, x_SBD):
        return self.slot(x_SBD)[0]


def _grad_buffers_on_cpu() -> None:
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: "cpu"  # megatron DDP's grad buffers on CPU (spawned worker process only)


def shard_spans(plan, model) -> tuple[dict, dict]:
    """What the plan says each parameter is, in numbers: (experts in all, first, end) for an expert shard,
    (dim, full size, first, end) for a tensor-parallel slice (None where the plan has no such step)."""
    ep_spans, tp_spans = {}, {}
    for name, p in model.named_parameters():
        ep_spans[name] = tp_spans[name] = None
        shard = plan.local_shards.get(name)
        for i, step in enumerate(shard.steps if shard else ()):
            rank, size = step.mesh.get_local_rank(), step.mesh.size()
            n = p.shape[step.dim] // step.blocks
            if i == 0 and step.dim == 0 and is_expert(name) and plan.ep > 1:
                ep_spans[name] = (p.shape[0] * size, rank * n, (rank + 1) * n)
            else:
                tp_spans[name] = (step.dim, p.shape[step.dim] * size, rank * n, (rank + 1) * n)
    return ep_spans, tp_spans


def slot_cases(rank: int, world: int, cases: list[tuple]) -> dict:
    """cases: (name, ep, gate options, sync: "megatron"[, tp]). Returns name -> diffs.

    Every rank of a TP group gets the same batch (its data-parallel rank's part of the global
    batch); its experts hold F/tp hidden units, compared with that slice of the reference."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from moeflow.parallel.integrations import megatron_ckpt as mck
    from moeflow.parallel.integrations.megatron_core import build_gpt_model, megatron_ddp, megatron_plan

    results = {}
    for name, ep, gate, sync, *tp in cases:
        tp = tp[0] if tp else 1
        ps.initialize_model_parallel(tp, 1, expert_model_parallel_size=ep)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        mc = model_config(gate)
        state = full_state(mc)
        gpt = build_gpt_model(mc, "cpu")
        plan = megatron_plan(gpt)
        slot_state = {
            k: v for k, v in mck.to_megatron(state, mc, native=False).items() if ".mlp." in k
        }  # attention: megatron's own TP layout
        gpt.load_state_dict(plan.local_state(slot_state), strict=False)
        gpt.double()
        slot = gpt.decoder.layers[0].mlp
        ref = build_moe_layer(mc).double()
        ref.load_state_dict({k[len("blocks.0.ffn.") :]: v for k, v in state.items() if k.startswith("blocks.0.ffn.")})

        dp, dp_rank = (
            ps.get_data_parallel_world_size(),
            ps.get_data_parallel_rank(),
        )  # distinct batches (TP ranks share one)
        gen = torch.Generator().manual_seed(5)
        x_RSBD = torch.randn(dp, S, B, D, generator=gen, dtype=torch.float64)
        g_RSBD = torch.randn(dp, S, B, D, generator=gen, dtype=torch.float64)
        x_ref = x_RSBD.reshape(-1, D).clone().requires_grad_()  # global token order = DP-rank-major, like the gate's
        y_ref = ref(x_ref)
        ((y_ref * g_RSBD.reshape(-1, D)).sum() / dp + ref.aux_loss).backward()

        _grad_buffers_on_cpu()
        wrapped = megatron_ddp(gpt)
        x_loc = x_RSBD[dp_rank].clone().requires_grad_()
        y_loc = SlotOnly(slot)(x_loc)
        (y_loc * g_RSBD[dp_rank]).sum().backward()  # the aux loss rides along via MoEAuxLossAutoScaler
        wrapped.finish_grad_sync()

        refs = dict(ref.named_parameters())
        gpt_names = {id(p): n for n, p in gpt.named_parameters()}
        ep_spans, tp_spans = shard_spans(plan, gpt)
        grads, shards, tp_shards, copies = {}, {}, {}, []
        for n, p in slot.moe.named_parameters():
            full_name = gpt_names[id(p)]
            grads[n] = _maxdiff(p.main_grad, plan.local(full_name, refs[n].grad))  # this rank's experts and F slice
            shards[n], tp_shards[n] = ep_spans[full_name], tp_spans[full_name]
            p.grad = p.main_grad
            copies.append(plan.copies(full_name, p))
        norm = clip_grad_norm_(list(slot.moe.parameters()), 1e9, copies=copies).item()  # every shard counted once
        sync_routing_stats(slot.moe, ps.get_data_parallel_group())  # the global batch's counts, TP duplicates once
        ref_norm = torch.nn.utils.get_total_norm([q.grad for q in refs.values()]).item()
        gathered = plan.full_state(gpt, unique_state_dict(gpt))  # checkpoints gather the shards back (collective)
        results[name] = {
            "out": _maxdiff(y_loc.detach(), y_ref.detach().view(dp, S, B, D)[dp_rank]),
            "x_grad": _maxdiff(x_loc.grad / dp, x_ref.grad.view(dp, S, B, D)[dp_rank]),
            "aux": abs(slot.moe.aux_loss.item() - ref.aux_loss.item()),
            "norm": abs(norm - ref_norm),
            "grads": grads,
            "shards": shards,
            "allreduce": {n: getattr(p, "allreduce", True) for n, p in slot.moe.named_parameters()},
            "expert_buffer_params": _expert_buffer_names(wrapped, slot),
            "gathered": max(_maxdiff(gathered[k].double(), v.double()) for k, v in slot_state.items()),
            "tp_shards": tp_shards,
            "tp_attrs": sorted(n for n, p in slot.moe.named_parameters() if getattr(p, "tensor_model_parallel", False)),
            "tp_group_size": ps.get_tensor_model_parallel_world_size(),
            "dp_group_size": dp,
            "dropped": float(slot.moe.last_stats.get("dropped_fraction", 0.0)),
            "routed_tokens": (slot.moe.last_stats["tokens_per_expert"].sum().item(), dp * S * B * mc.top_k),
            "ep_rank": ps.get_expert_model_parallel_rank(),
            "ep_group_size": ps.get_expert_model_parallel_world_size(),
            "edp_group_size": ps.get_expert_data_parallel_world_size(),
        }
        ps.destroy_model_parallel()
    return results


def _expert_buffer_names(ddp, slot) -> list[str]:
    names = {p: n for n, p in slot.moe.named_parameters()}
    return sorted(names[p] for buf in ddp.expert_parallel_buffers for p in buf.params if p in names)


# ---- engine=megatron's engine object under parallel.ep (everything but GPTModel's forward) -----

ENGINE_OVERRIDES = [
    "engine=megatron",
    "trainer.device=cpu",
    "trainer.precision=fp32",
    "experts.impl=torch",
    "optim.weight_decay=0.0",
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=4",
    "model.max_seq_len=16",
    "model.d_ff=24",
    "model.num_experts=4",
]


def _engine_config(*overrides: str):
    from hydra import compose, initialize_config_module

    from moeflow.launch.config import model_config, trainer_config

    with initialize_config_module(config_module="moeflow.configs", version_base=None):
        cfg = compose(config_name="train", overrides=[*ENGINE_OVERRIDES, *overrides])
    return cfg, model_config(cfg), trainer_config(cfg)


def _build_engine(cfg, mc, tc, run_dir):
    from moeflow.launch.engines.megatron_engine import MegatronEngine

    _grad_buffers_on_cpu()
    env, device = MegatronEngine.start(cfg, tc)
    torch.manual_seed(tc.seed)  # as train() does before building the engine
    return MegatronEngine(cfg, mc, tc, env, device, run_dir)


def engine_step(rank: int, world: int, ep: int, run_dir: str, *overrides: str) -> dict:
    """MegatronEngine built from a train config with parallel.ep=ep on CPU (the loop itself needs
    CUDA for GPTModel's forward): parallel_state's groups, the expert-aware wrapper, the weights
    it starts from, one optimizer step on given gradients (written where megatron DDP's backward puts
    them, its grad buffers: expert-shard sync over the expert-DP group, clipping with each shard counted
    once, AdamW), the gathered checkpoint, and a resume
    on the same layout. The gradients: a full moeflow-layout G the same on every rank; dense
    params get G (what DDP's mean would leave), expert shards get G's rows times world * w_d,
    with w_d summing to 1 over the expert-DP replicas d (what the EDP sum / world must undo).
    `overrides` (e.g. parallel.tp=2): TP-sliced params get their slice of G."""
    from pathlib import Path

    from megatron.core import parallel_state as ps

    from moeflow.launch import checkpoint as ckpt
    from moeflow.parallel.integrations import megatron_ckpt as mck

    cfg, mc, tc = _engine_config(f"parallel.ep={ep}", *overrides)
    engine = _build_engine(cfg, mc, tc, Path(run_dir))
    torch.manual_seed(tc.seed)
    init = unique_state_dict(Transformer(mc))  # the torch engine's initial weights (full)
    ep_spans, tp_spans = shard_spans(engine.plan, engine.gpt)
    shards = {n: s for n, s in ep_spans.items() if s is not None}
    opt_numel = sum(p.numel() for g in engine.opt.param_groups for p in g["params"])

    dense_mlp = _dense_mlp_vs_moeflow(engine.gpt, mc, init) if not mc.is_moe_block(0) else None

    G = {
        k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
        for i, (k, v) in enumerate(sorted(init.items()))
    }
    local_G = engine.plan.local_state(mck.to_megatron(G, mc, native=False))
    edp, d = ps.get_expert_data_parallel_world_size(), ps.get_expert_data_parallel_rank()
    w_d = (d + 1) / (edp * (edp + 1) / 2)  # sums to 1 over the expert-DP replicas
    for n, p in engine.gpt.named_parameters():
        p.main_grad.copy_(local_G[n] * (world * w_d if n in shards else 1.0))
    lr = engine.opt.param_groups[0]["lr"]
    grad_norm = engine.optimizer_step()

    ref = {k: v.clone().requires_grad_() for k, v in init.items()}  # one process, full experts
    for k, p in ref.items():
        p.grad = G[k].clone()
    ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.values()), cfg.optim.grad_clip).item()
    torch.optim.AdamW(
        list(ref.values()), lr=lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=0.0
    ).step()

    path = engine.save(1)  # collective: gathers the expert shards and their moments
    torch.distributed.barrier()  # rank 0 wrote it; every rank resumes from it
    from moeflow.parallel.checkpoint import read_full_tensors

    found = ckpt.find_checkpoint(Path(run_dir))
    saved = read_full_tensors(found, "model.")
    moments = read_full_tensors(found, "megatron_optim.")
    expert_moment_rows = sorted(
        {v.shape[0] for k, v in moments.items() if k.endswith(".exp_avg") and v.dim() == 3}
    )  # the experts' [E, ., .] tensors

    resumed = _build_engine(_with_changes(cfg, resume=str(run_dir)), mc, tc, Path(run_dir))
    mine, theirs = engine.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    result = {
        "ep_size": ps.get_expert_model_parallel_world_size(),
        "edp_size": edp,
        "ep_rank": ps.get_expert_model_parallel_rank(),
        "dense_mlp": dense_mlp,
        "tp_size": ps.get_tensor_model_parallel_world_size(),
        "data_parallel_rank": engine.data_parallel_rank,
        "tp_sliced": sorted(n for n, s in tp_spans.items() if s is not None),
        "local_vs_full": (
            sum(p.numel() for p in engine.gpt.parameters()),
            sum(v.numel() for v in mck.to_megatron(init, mc, native=False).values()),
        ),
        "wrapper": f"{type(engine.ddp).__module__}.{type(engine.ddp).__name__}",
        "wrapped_model": engine.ddp.module is engine.gpt,
        "shards": shards,
        "opt_numel": opt_numel,
        "local_numel": sum(p.numel() for p in engine.gpt.parameters()),
        "grad_norm": (grad_norm, ref_norm),
        "saved_path": str(path) if path else None,
        "weights": max(_maxdiff(saved[k], ref[k].detach()) for k in ref)
        if sorted(saved) == sorted(ref)
        else float("inf"),
        "expert_moment_rows": expert_moment_rows,
        "resume_step": resumed.start_step,
        "resume_weights": max(_maxdiff(p, q) for p, q in zip(engine.gpt.parameters(), resumed.gpt.parameters())),
        "resume_moments": max(_maxdiff(mine[i][k], theirs[i][k]) for i in mine for k in ("exp_avg", "exp_avg_sq"))
        if sorted(mine) == sorted(theirs)
        else float("inf"),
    }
    resumed.close()
    return result


def _dense_mlp_vs_moeflow(gpt, mc, init) -> float:
    """megatron's dense MLP of block 0 (its TP slices, megatron's mappings) vs moeflow's MLP with the full
    weights: the slices must follow megatron's compute layout (gated fc1 = [w1 slice; w3 slice] per rank)."""
    ref = Transformer(mc)
    ref.load_state_dict(init, strict=False)
    x = torch.randn(3, 2, mc.d_model, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        return _maxdiff(gpt.decoder.layers[0].mlp(x)[0], ref.blocks[0].ffn(x))


def _with_changes(cfg, **changes):
    from omegaconf import OmegaConf

    out = OmegaConf.create(OmegaConf.to_container(cfg))
    for k, v in changes.items():
        OmegaConf.update(out, k, v)
    return out
