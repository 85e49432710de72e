"""Multi-process workers: moeflow's MoE layer inside megatron-core under expert parallelism.

Each rank initialises megatron-core's parallel_state (gloo, CPU) with an EP size, builds a
GPTModel through moeflow's layer spec (`build_gpt_model`: the MoE slot is `MoeflowMoE`,
which shards its experts over parallel_state's expert group), loads the same full weights
on every rank (sliced to its experts like the training loop does), runs the MoE slot on
this rank's part of the global batch and compares it with one moeflow `MoELayer` holding
the full weights on the whole batch (float64). Gradients are synchronised two ways:
- moeflow's `ExpertDataParallel` over parallel_state's groups (`megatron_core.data_parallel`);
- megatron-core's own `DistributedDataParallel`, which must put the params `MoeflowMoE`
  marks `allreduce=False` into its expert buffers (reduced over the expert-data-parallel
  group). Its grad buffers are allocated with `torch.cuda.current_device()`; on CPU the
  worker points that at "cpu" (nothing else in its all-reduce path needs CUDA).

GPTModel's own forward (attention, rotary) needs CUDA, so only the MoE slot runs here.
"""
from __future__ import annotations

import torch
from torch import nn

from moeflow.launch.checkpoint import unique_state_dict
from moeflow.moe.model import ModelConfig, Transformer, build_moe_layer
from moeflow.parallel.expert_parallel import expert_shard
from moeflow.parallel.sharded_state import full_model_state, local_model_state

from ep_workers import _maxdiff

D, F_, E, K, S, B = 16, 24, 4, 2, 3, 2  # tokens: S x B per rank


def model_config(gate: dict) -> ModelConfig:
    return ModelConfig(vocab_size=32, d_model=D, n_layers=1, n_heads=2, max_seq_len=8, d_ff=F_, num_experts=E, top_k=K,
                       shared_experts=1, gate=gate)


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


def _megatron_ddp(gpt):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: "cpu"  # grad buffers on CPU (spawned worker process only)
    return DistributedDataParallel(gpt.config, DistributedDataParallelConfig(), gpt)


def slot_cases(rank: int, world: int, cases: list[tuple]) -> dict:
    """cases: (name, ep, gate options, sync: "moeflow" | "megatron"). Returns name -> diffs."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from moeflow.parallel.integrations import megatron_ckpt as mck
    from moeflow.parallel.integrations.megatron_core import build_gpt_model, data_parallel

    results = {}
    for name, ep, gate, sync in cases:
        ps.initialize_model_parallel(1, 1, expert_model_parallel_size=ep)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
        mc = model_config(gate)
        state = full_state(mc)
        gpt = build_gpt_model(mc, "cpu")
        gpt.load_state_dict(local_model_state(gpt, mck.to_megatron(state, mc, native=False)), strict=False)
        gpt.double()
        slot = gpt.decoder.layers[0].mlp
        ref = build_moe_layer(mc).double()
        ref.load_state_dict({k[len("blocks.0.ffn."):]: v for k, v in state.items() if k.startswith("blocks.0.ffn.")})

        gen = torch.Generator().manual_seed(5)
        x_RSBD = torch.randn(world, S, B, D, generator=gen, dtype=torch.float64)
        g_RSBD = torch.randn(world, S, B, D, generator=gen, dtype=torch.float64)
        x_ref = x_RSBD.reshape(-1, D).clone().requires_grad_()  # global token order = rank-major, like the gate's
        y_ref = ref(x_ref)
        ((y_ref * g_RSBD.reshape(-1, D)).sum() / world + ref.aux_loss).backward()

        if sync == "moeflow":
            wrapped = data_parallel(SlotOnly(slot))  # torch DDP: only the slot's params take part
            run, finish = wrapped, wrapped.finish_grad_sync
            grad_of = lambda p: p.grad  # noqa: E731
        else:
            wrapped = _megatron_ddp(gpt)
            run, finish = SlotOnly(slot), wrapped.finish_grad_sync
            grad_of = lambda p: p.main_grad  # noqa: E731
        x_loc = x_RSBD[rank].clone().requires_grad_()
        y_loc = run(x_loc)
        (y_loc * g_RSBD[rank]).sum().backward()  # the aux loss rides along via MoEAuxLossAutoScaler
        finish()

        refs = dict(ref.named_parameters())
        grads, shards = {}, {}
        for n, p in slot.moe.named_parameters():
            shard = expert_shard(p)
            want = refs[n].grad[shard[1]:shard[2]] if shard else refs[n].grad
            grads[n] = _maxdiff(grad_of(p), want)
            shards[n] = shard
        gathered = full_model_state(gpt)  # checkpoints gather the shards back (collective)
        results[name] = {
            "out": _maxdiff(y_loc.detach(), y_ref.detach().view(world, S, B, D)[rank]),
            "x_grad": _maxdiff(x_loc.grad / world, x_ref.grad.view(world, S, B, D)[rank]),
            "aux": abs(slot.moe.aux_loss.item() - ref.aux_loss.item()),
            "grads": grads,
            "shards": shards,
            "allreduce": {n: getattr(p, "allreduce", True) for n, p in slot.moe.named_parameters()},
            "expert_buffer_params": _expert_buffer_names(wrapped, slot) if sync == "megatron" else None,
            "gathered": max(_maxdiff(gathered[k].double(), v.double()) for k, v in mck.to_megatron(state, mc, native=False).items() if k in gathered),
            "dropped": float(slot.moe.last_stats.get("dropped_fraction", 0.0)),
            "ep_rank": ps.get_expert_model_parallel_rank(),
            "ep_group_size": ps.get_expert_model_parallel_world_size(),
            "edp_group_size": ps.get_expert_data_parallel_world_size(),
        }
        ps.destroy_model_parallel()
    return results


def _expert_buffer_names(ddp, slot) -> list[str]:
    names = {p: n for n, p in slot.moe.named_parameters()}
    return sorted(names[p] for buf in ddp.expert_parallel_buffers for p in buf.params if p in names)
