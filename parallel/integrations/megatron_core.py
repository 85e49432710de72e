"""moeflow's MoE layer inside megatron-core models (`pip install moeflow[megatron]`).

`MoeflowMoE` fills the `mlp` slot of a megatron-core `TransformerLayer` with moeflow's
`MoELayer` (any gate, any experts implementation): it takes megatron's [S, B, H] hidden
states, returns `(output, None)` like megatron's MLP/MoE, and attaches the gate's aux
loss with megatron's own `MoEAuxLossAutoScaler`, so megatron's schedules backpropagate
it (no change to the loss function). Process groups come from megatron-core's
`parallel_state` (`MegatronGroups`).

Expert parallelism: with `expert_model_parallel_size > 1` each MoeflowMoE keeps its EP
rank's experts and sends tokens over parallel_state's expert group with moeflow's
`AllToAllDispatcher` (`shard_over_expert_group`). Expert params carry megatron's own marker
`allreduce=False`, so megatron-core's DistributedDataParallel (`megatron_ddp`) reduces them
over the expert-data-parallel group and its optimizer treats them as expert params. Matches
one process on the global batch (tests/distributed/test_megatron_core.py, gloo, 2 and 4 ranks).

Sharding is recorded once, in megatron's own attributes (`allreduce`, `tensor_model_parallel`,
`partition_dim`, `partition_stride`); `megatron_plan(model)` reads them into moeflow's
`ParallelPlan` (DTensor placements over meshes made from parallel_state's groups), which
clipping and full-tensor checkpoints use.

`gpt_layer_specs(model_cfg)` gives one layer spec per block (moeflow MoE where
`model_cfg.is_moe_block(i)`, megatron's dense MLP elsewhere), `build_gpt_model(model_cfg)`
a `GPTModel` with moeflow's architecture (RMSNorm, interleaved rotary, no biases,
SwiGLU/GELU), whose weights map one-to-one onto a moeflow `Transformer`
(`megatron_ckpt.py`).

Where it runs: parallel_state (gloo), model construction (`use_cpu_initialization`) and
the MoeflowMoE submodule run on CPU, expert-parallel too (megatron's DDP included once its
grad buffers, allocated on `torch.cuda.current_device()`, are pointed at the CPU). The forward of megatron-core's attention
(`DotProductAttention` allocates from a CUDA memory buffer) and of `GPTModel`'s rotary
embedding (moves its frequencies to CUDA) need a GPU, so TransformerLayer/GPTModel
forwards and `moeflow train engine=megatron` need CUDA.

Tensor parallelism (`tensor_model_parallel_size > 1`, sequence parallelism off):
`shard_over_tensor_group` splits each MoE slot's experts and shared expert on their hidden
dim with megatron-core's copy/reduce mappings; the gate stays replicated. Checked against one
process on gloo (TP=2, TP=2 x EP=2); megatron's attention TP itself needs CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeflow.moe.errors import ConfigError, MoeflowError
from moeflow.moe.layer import moe_aux_loss, moe_layers
from moeflow.moe.model import ModelConfig, build_moe_layer

CPU_MESSAGE = (
    "engine=megatron needs a CUDA GPU: megatron-core's attention (DotProductAttention's memory buffer) and "
    "GPTModel's rotary embedding allocate on CUDA; on CPU, megatron-core's parallel_state, model construction and "
    "the moeflow MoE submodule run (see tests/distributed/test_megatron_core.py); use engine=torch or engine=deepspeed on CPU"
)


@dataclass
class MegatronGroups:
    """The process groups moeflow needs, from megatron-core's parallel_state.

    tp: tensor parallel; dp: data parallel with context parallel (every rank holding a
    replica of the dense weights: gates count tokens over it); ep: expert model parallel
    (experts are sharded over it, tokens travel over it); expert_dp: expert data parallel
    (ranks holding the same expert shard: expert gradients are reduced over it).
    """

    tp: object
    dp: object
    ep: object
    expert_dp: object

    @classmethod
    def from_parallel_state(cls) -> MegatronGroups:
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            raise MoeflowError(
                "megatron-core's parallel_state is not initialized; call parallel_state.initialize_model_parallel(...) first"
            )
        return cls(
            tp=ps.get_tensor_model_parallel_group(),
            dp=ps.get_data_parallel_group(with_context_parallel=True),
            ep=ps.get_expert_model_parallel_group(),
            expert_dp=ps.get_expert_data_parallel_group(),
        )

    @staticmethod
    def size(group) -> int:
        return (
            torch.distributed.get_world_size(group) if group is not None and torch.distributed.is_initialized() else 1
        )

    def mesh(self, group, device_type: str):
        """A 1-D DeviceMesh over one of parallel_state's groups (None for a group of one)."""
        from torch.distributed.device_mesh import DeviceMesh

        return DeviceMesh.from_group(group, device_type) if self.size(group) > 1 else None


def megatron_ddp(model):
    """megatron-core's DistributedDataParallel over parallel_state's groups: dense gradients averaged over
    the data-parallel group, expert shards (`allreduce=False`) over the expert-data-parallel group, both
    scaled by 1/dp; gradients land in each parameter's `main_grad` (`finish_grad_sync()` once a step)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    return DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)


def megatron_plan(model, world: int | None = None):
    """moeflow's `ParallelPlan` of a megatron-core model, read from megatron's own sharding attributes:
    expert shards (`allreduce=False`: Shard(0) over the EP group), then tensor-parallel slices
    (`tensor_model_parallel`: Shard(partition_dim) of `partition_stride` blocks over the TP group)."""
    from moeflow.parallel.plan import LocalShard, ParallelPlan, ShardStep

    groups = MegatronGroups.from_parallel_state()
    device_type = next(model.parameters()).device.type
    ep_mesh, tp_mesh = groups.mesh(groups.ep, device_type), groups.mesh(groups.tp, device_type)
    shards = {}
    for name, p in model.named_parameters():
        steps = []
        if ep_mesh is not None and getattr(p, "allreduce", True) is False:
            steps.append(ShardStep(ep_mesh, 0))
        if tp_mesh is not None and getattr(p, "tensor_model_parallel", False):
            steps.append(ShardStep(tp_mesh, p.partition_dim, getattr(p, "partition_stride", 1)))
        if steps:
            shards[name] = LocalShard(tuple(steps))
    world = world or (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1)
    return ParallelPlan(world=world, ep=MegatronGroups.size(groups.ep), local_shards=shards)


def shard_over_expert_group(moe, groups: MegatronGroups) -> None:
    """Expert parallelism for one moeflow MoELayer over parallel_state's groups.

    - EP > 1: keep this EP rank's experts (`expert_rows`: experts [r*L, (r+1)*L), megatron's
      own placement) and send tokens over the EP group (`AllToAllDispatcher`);
    - the gate counts tokens (load, aux losses, capacity) over the data-parallel group, i.e.
      the global batch, as engine=torch does over the world;
    - expert params get megatron's marker `allreduce = not expert_parallel` (what its
      ColumnParallelLinear/GroupedMLP set): megatron's DistributedDataParallel puts
      `allreduce=False` params in its expert buffers, reduced over the expert-data-parallel
      group with the same 1/dp scaling as dense grads, and its optimizer keeps them in the
      expert optimizer; `megatron_plan` reads it as "sharded by expert".
    """
    from moeflow.parallel.all_to_all import AllToAllDispatcher
    from moeflow.parallel.plan import EXPERT_WEIGHTS, expert_rows

    ep = MegatronGroups.size(groups.ep)
    experts = moe.experts
    if ep > 1:
        if experts.num_experts % ep:
            raise ConfigError(
                f"expert_model_parallel_size={ep} does not divide model.num_experts={experts.num_experts}; pick an EP size that divides the experts"
            )
        rank = torch.distributed.get_rank(groups.ep)
        for name in EXPERT_WEIGHTS:
            p = getattr(experts, name, None)
            if p is not None:
                p.data = expert_rows(p.data, rank, ep)
        moe.dispatcher = AllToAllDispatcher(groups.ep, ep, experts.num_experts // ep)
    if MegatronGroups.size(groups.dp) > 1:
        moe.gate.token_group = groups.dp
    for p in experts.parameters():
        p.allreduce = ep == 1


def shard_over_tensor_group(moe, groups: MegatronGroups) -> None:
    """Tensor parallelism (sequence parallelism off) for one moeflow MoELayer over parallel_state's TP group.

    The hidden states entering megatron's MLP slot are the same on every TP rank. Each rank
    keeps F/tp hidden units of every expert and of the shared expert (`shard_hidden_dim`:
    column-parallel w1/w3, row-parallel w2); the expert/shared-expert input goes through
    megatron's `copy_to_tensor_model_parallel_region` (identity; backward all-reduce of the
    partial input grads) and their output through `reduce_from_tensor_model_parallel_region`
    (all-reduce of the partial outputs), before the gate weights the rows, so the gate's
    weights get full gradients. The gate is replicated: same inputs and weights on every TP
    rank, hence the same routing and the same full gradient on each (megatron's DDP and
    `data_parallel` reduce over the data-parallel group only, which excludes TP: nothing is
    counted twice). Sharded params get megatron's `tensor_model_parallel` attributes (its
    grad-norm counts them on every TP rank, replicated params once). Routed experts use the
    TP group: parallel_state's expert-tensor-parallel group must be the same ranks.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import (
        copy_to_tensor_model_parallel_region,
        reduce_from_tensor_model_parallel_region,
    )
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    from moeflow.parallel.tensor_parallel import shard_hidden_dim

    tp = MegatronGroups.size(groups.tp)
    if tp == 1:
        return
    if ps.get_expert_tensor_parallel_world_size() != tp:
        raise ConfigError(
            f"expert_tensor_parallel_size={ps.get_expert_tensor_parallel_world_size()} differs from tensor_model_parallel_size={tp}; the moeflow MoE layer shards its experts over the TP group: leave expert_tensor_parallel_size unset"
        )
    for p, dim in shard_hidden_dim(moe, torch.distributed.get_rank(groups.tp), tp):
        set_tensor_model_parallel_attributes(p, True, dim, 1)
    for module in (moe.experts, moe.shared_expert):
        if module is not None:
            module.register_forward_pre_hook(
                lambda m, args: (copy_to_tensor_model_parallel_region(args[0], groups.tp), *args[1:])
            )
            module.register_forward_hook(lambda m, args, out: reduce_from_tensor_model_parallel_region(out, groups.tp))


def _define_moeflow_moe():
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    class MoeflowMoE(MegatronModule):
        """megatron-core MLP slot -> moeflow MoELayer. Params: `model_cfg` (a moeflow ModelConfig dict)."""

        def __init__(self, config, model_cfg: dict, pg_collection=None, **_unused):
            super().__init__(config=config)
            model_cfg = ModelConfig(**model_cfg)
            if config.hidden_size != model_cfg.d_model:
                raise ConfigError(
                    f"megatron hidden_size={config.hidden_size} differs from moeflow model.d_model={model_cfg.d_model}; set the same width in both configs"
                )
            self.groups = MegatronGroups.from_parallel_state()
            self.moe = build_moe_layer(model_cfg)
            self.moe.input_layout = "sbd"  # megatron's hidden states are [seq, batch, hidden]
            shard_over_expert_group(self.moe, self.groups)
            shard_over_tensor_group(self.moe, self.groups)

        def forward(self, hidden_states: torch.Tensor, padding_mask=None, **_unused):
            y = self.moe(hidden_states)
            aux = self.moe.aux_loss
            if self.training and aux is not None and aux.requires_grad:
                y = MoEAuxLossAutoScaler.apply(y, aux.to(y.dtype))  # megatron scales it like the main loss
            return y, None

    return MoeflowMoE


_MOEFLOW_MOE = []


def __getattr__(name: str):
    """`MoeflowMoE` is defined on first use: importing megatron-core is slow and noisy, and
    config checks (which import this module) must not pay for it."""
    if name == "MoeflowMoE":
        if not _MOEFLOW_MOE:
            _MOEFLOW_MOE.append(_define_moeflow_moe())
        return _MOEFLOW_MOE[0]
    raise AttributeError(name)


def transformer_config(model_cfg: ModelConfig, cpu_init: bool, bf16: bool = False):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from .megatron_ckpt import check_mappable

    check_mappable(model_cfg)  # features the megatron-side model does not express
    gelu_tanh = lambda x: F.gelu(x, approximate="tanh")  # noqa: E731  (moeflow's GELU)
    return TransformerConfig(
        num_layers=model_cfg.n_layers,
        hidden_size=model_cfg.d_model,
        num_attention_heads=model_cfg.n_heads,
        num_query_groups=model_cfg.kv_heads,
        kv_channels=model_cfg.head_size,
        ffn_hidden_size=model_cfg.dense_d_ff or model_cfg.d_ff * model_cfg.top_k,
        normalization="RMSNorm",
        layernorm_epsilon=model_cfg.norm_eps,
        gated_linear_unit=model_cfg.activation == "swiglu",
        activation_func=F.silu if model_cfg.activation == "swiglu" else gelu_tanh,
        add_bias_linear=False,
        rotary_interleaved=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        init_method_std=model_cfg.init_std,
        use_cpu_initialization=cpu_init,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
    )


def gpt_layer_specs(model_cfg: ModelConfig):
    """Block spec: megatron-core's local layer spec with `mlp` = MoeflowMoE on moeflow's MoE blocks."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    dense = get_gpt_layer_local_spec(normalization="RMSNorm")
    moe_mlp = ModuleSpec(module=__getattr__("MoeflowMoE"), params={"model_cfg": model_cfg.to_dict()})
    layers = []
    for i in range(model_cfg.n_layers):
        if model_cfg.is_moe_block(i):
            spec = get_gpt_layer_local_spec(normalization="RMSNorm")
            spec.submodules.mlp = moe_mlp
            layers.append(spec)
        else:
            layers.append(dense)
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=dense.submodules.input_layernorm)


def build_gpt_model(model_cfg: ModelConfig, device: torch.device | str = "cuda", bf16: bool = False):
    """A megatron-core GPTModel with moeflow's architecture and MoE layers (parallel_state must be initialized)."""
    from megatron.core.models.gpt import GPTModel

    device = torch.device(device)
    config = transformer_config(model_cfg, cpu_init=device.type == "cpu", bf16=bf16)
    groups = MegatronGroups.from_parallel_state()
    tp = MegatronGroups.size(groups.tp)
    model = GPTModel(
        config,
        gpt_layer_specs(model_cfg),
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.max_seq_len,
        position_embedding_type="rope",
        rotary_base=int(model_cfg.rope_theta),
        share_embeddings_and_output_weights=model_cfg.tie_embeddings,
        parallel_output=tp == 1,
    )  # TP: logits gathered over the vocab, so moeflow's loss sees all of them
    return model.to(device)


def gpt_logits(model, tokens_BS: torch.Tensor) -> torch.Tensor:
    """GPTModel forward on a token batch -> logits [B, S, V] (causal mask from the layer spec)."""
    S = tokens_BS.shape[1]
    position_ids = torch.arange(S, device=tokens_BS.device).unsqueeze(0).expand_as(tokens_BS)
    return model(tokens_BS, position_ids, None)


def build_native_gpt_model(
    model_cfg: ModelConfig,
    device: torch.device | str = "cuda",
    layout: str = "sequential",
    dispatcher: str = "alltoall",
):
    """megatron-core's own MoE GPTModel with moeflow's architecture: the target of `megatron_ckpt.to_megatron`.

    layout: "sequential" (SequentialMLP), "grouped" (legacy GroupedMLP, needs the
    grouped_gemm package) or "te_grouped" (TEGroupedMLP, needs Transformer Engine).
    """
    import dataclasses

    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from .megatron_ckpt import router_config

    device = torch.device(device)
    base = transformer_config(model_cfg, cpu_init=device.type == "cpu")
    shared = (model_cfg.dense_d_ff or model_cfg.d_ff * model_cfg.top_k) * model_cfg.shared_experts
    config = dataclasses.replace(
        base,
        num_moe_experts=model_cfg.num_experts,
        moe_ffn_hidden_size=model_cfg.d_ff,
        moe_layer_freq=[1 if model_cfg.is_moe_block(i) else 0 for i in range(model_cfg.n_layers)],
        moe_shared_expert_intermediate_size=shared or None,
        moe_token_dispatcher_type=dispatcher,
        moe_grouped_gemm=layout != "sequential",
        moe_use_legacy_grouped_gemm=layout == "grouped",
        **router_config(model_cfg),
    )
    _patch_router_without_transformer_engine()
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=layout == "te_grouped", normalization="RMSNorm")
    model = GPTModel(
        config,
        spec,
        vocab_size=model_cfg.vocab_size,
        max_sequence_length=model_cfg.max_seq_len,
        position_embedding_type="rope",
        rotary_base=int(model_cfg.rope_theta),
        share_embeddings_and_output_weights=model_cfg.tie_embeddings,
    )
    return model.to(device)


class MegatronLM(torch.nn.Module):
    """A megatron-core GPTModel seen as a moeflow LM: tokens -> logits, `moe_layers()`, `aux_loss()`."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt

    def forward(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        return gpt_logits(self.gpt, tokens_BS)

    def moe_layers(self) -> list:
        return moe_layers(self.gpt)

    def aux_loss(self) -> torch.Tensor:
        return moe_aux_loss(self.gpt)


def initialize_parallel_state(seed: int, tensor_parallel: int = 1, expert_parallel: int = 1) -> None:
    """megatron-core's process groups (and its CUDA RNG tracker) over the current torch.distributed world."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if not dist.is_initialized():  # one process: a private group
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=1,
            expert_model_parallel_size=expert_parallel,
        )
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(seed)


def _patch_router_without_transformer_engine() -> None:
    """megatron-core 0.16.1's router GEMM tests `te_general_gemm is not None`, a name that only exists
    when Transformer Engine imports (NameError otherwise); define it as None so its torch path runs."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
