"""engine=megatron: train a megatron-core GPTModel whose MoE layers are moeflow's.

The model comes from `moeflow.parallel.integrations.megatron_core.build_gpt_model` (the
moeflow layer spec), starts from exactly the weights the torch engine would initialise
(same seed, converted), and trains with the same data, AdamW, schedule, clipping and
logging as engine=torch. The gates' aux losses reach the gradients through megatron-core's
`MoEAuxLossAutoScaler` (scaled by 1/grad_accum like the main loss). Checkpoints are moeflow
checkpoints through `launch/resume.py` (weights converted back to the moeflow layout, the
megatron-ordered AdamW state under its own key), so engine=torch can resume them (with
fresh AdamW moments) and `moeflow convert` exports them. Needs CUDA: see
`megatron_core.CPU_MESSAGE`.

Expert parallelism (`parallel.ep` > 1) is megatron-core's `expert_model_parallel_size`: each
MoE slot keeps its EP rank's experts and routes over parallel_state's expert group
(`megatron_core.shard_over_expert_group`). Gradients are reduced by megatron-core's own
DistributedDataParallel (`megatron_core.megatron_ddp`: expert shards over the expert-data-parallel
group); the step is engine=torch's (moeflow's clipping over the model's `ParallelPlan`, which
`megatron_core.megatron_plan` reads from megatron's attributes, torch AdamW and schedule).
Checkpoints gather the expert shards through the plan (written full, like one process would)
and resume on any EP size.

Tensor parallelism (`parallel.tp` > 1, sequence parallelism off) is megatron-core's
own for attention, embedding and output layer (logits gathered over the vocab), and
`megatron_core.shard_over_tensor_group` for the MoE slots (experts split on their hidden
dim). The ranks of a TP group train on the same batch (parallel_state's data-parallel rank);
checkpoints gather every TP slice too, so they stay single-process checkpoints.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from moeflow.moe.errors import CheckpointError, ConfigError
from moeflow.moe.model import ModelConfig, Transformer
from moeflow.moe.state import unique_state_dict
from moeflow.parallel.clip import clip_grad_norm_
from moeflow.parallel.distributed import DistEnv
from moeflow.parallel.integrations import megatron_ckpt as mck
from moeflow.parallel.integrations import megatron_core as mcore

from ..losses import lm_loss
from ..optim import build_scheduler, optimizer_groups, replay_schedule
from ..profiling import phase
from ..runtime import bf16_autocast, start_distributed
from .contract import MoeflowCheckpointEngine

log = logging.getLogger("moeflow.train")


def check_options(cfg: DictConfig, model_cfg: ModelConfig, device: torch.device) -> None:
    """What engine=megatron cannot run, refused before any work with the reason."""
    try:
        mck.check_mappable(model_cfg)
    except mck.ConversionError as err:
        raise ConfigError(f"engine=megatron: {err}") from None
    if device.type != "cuda":
        raise ConfigError(mcore.CPU_MESSAGE)
    check_tensor_parallel(int(cfg.parallel.tp), int(cfg.parallel.ep), model_cfg)
    # parallel.ep > 1 is megatron's expert_model_parallel_size; whether the layout is possible
    # (ep divides the experts and the world) is checked by launch.config.check_parallel.
    p = cfg.parallel
    if int(p.overlap_chunks) != 1 or bool(p.overlap_shared):
        raise ConfigError(
            "parallel.overlap_chunks/overlap_shared are not wired into engine=megatron (its MoE slot dispatches without overlap); use parallel.overlap_chunks=1 parallel.overlap_shared=false or engine=torch"
        )


def check_tensor_parallel(tp: int, ep: int, model_cfg: ModelConfig) -> None:
    """parallel.tp: megatron-core splits heads, vocab and FFN hidden dims over it."""
    if tp < 1:
        raise ConfigError(f"parallel.tp must be a positive integer, got {tp}")
    if tp == 1:
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (tp * ep):
        raise ConfigError(
            f"parallel.tp={tp} x parallel.ep={ep} does not divide the world size {world}; launch a multiple of {tp * ep} ranks"
        )
    sizes = {
        "model.n_heads": model_cfg.n_heads,
        "model.n_kv_heads": model_cfg.kv_heads,
        "model.vocab_size": model_cfg.vocab_size,
        "model.d_ff": model_cfg.d_ff,
        "the dense/shared-expert FFN size (model.dense_d_ff or d_ff x top_k)": model_cfg.dense_d_ff
        or model_cfg.d_ff * model_cfg.top_k,
    }
    for what, n in sizes.items():
        if n % tp:
            raise ConfigError(
                f"parallel.tp={tp} does not divide {what}={n}; pick a tensor-parallel size that divides it"
            )


def start_megatron(cfg: DictConfig, trainer_cfg) -> tuple[DistEnv, torch.device]:
    """Join the process group like engine=torch, then megatron-core's parallel_state (TP, EP groups)."""
    env, device = start_distributed(
        trainer_cfg, cfg.parallel.backend
    )  # CUDA: check_options refused CPU (tests build on CPU)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mcore.initialize_parallel_state(
        trainer_cfg.seed, tensor_parallel=int(cfg.parallel.tp), expert_parallel=int(cfg.parallel.ep)
    )
    return env, device


class MegatronEngine(MoeflowCheckpointEngine):
    """The engine contract (`contract.Engine`); its optimizer step (expert-shard gradient sync,
    clipping, AdamW) is engine=torch's."""

    name = "megatron"

    start = staticmethod(start_megatron)

    def __init__(self, cfg: DictConfig, model_cfg, trainer_cfg, env: DistEnv, device: torch.device, run_dir: Path):
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        self.cfg, self.model_cfg, self.env, self.device, self.run_dir, self.grad_accum = (
            cfg,
            model_cfg,
            env,
            device,
            run_dir,
            trainer_cfg.grad_accum,
        )
        self.use_bf16, self.autocast = bf16_autocast(trainer_cfg, device)
        init = initial_weights(model_cfg, device)  # the torch engine's initial weights: same seed, same device
        self.gpt = mcore.build_gpt_model(model_cfg, device)  # with parallel.ep > 1: this EP rank's experts only
        self.model = self.eval_model = mcore.MegatronLM(self.gpt)
        self.plan = mcore.megatron_plan(self.gpt)  # which tensors are shards, read from megatron's attributes
        self.opt = torch.optim.AdamW(
            optimizer_groups(self.gpt, cfg.optim.weight_decay),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            eps=cfg.optim.eps,
        )
        self.sched = build_scheduler(self.opt, cfg.optim, trainer_cfg.steps)
        load_moeflow_weights(self.gpt, self.plan, init, model_cfg)
        # (rank, size) of parallel_state's data-parallel group: the ranks of one TP group train on the same batch
        self.data_parallel_rank = (
            (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()) if env.enabled else (0, 1)
        )
        self.data_parallel_group = (
            ps.get_data_parallel_group() if env.enabled else None
        )  # routing stats: each batch once
        self.start_step = self.start_checkpoints(trainer_cfg)  # a checkpoint's weights replace the initial ones
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / trainer_cfg.grad_accum, device=device))
        # dense grads averaged over parallel_state's data-parallel group, expert shards over its expert-data-parallel group
        self.ddp = mcore.megatron_ddp(self.gpt) if env.enabled else None

    def describe(self) -> str:
        return (
            f"engine megatron: megatron-core GPTModel with {len(self.model.moe_layers())} moeflow MoE layers, "
            f"{sum(p.numel() for p in self.gpt.parameters()) / 1e6:.2f}M parameters, {'bf16' if self.use_bf16 else 'fp32'}, world {self.env.world_size}"
        )

    def forward_backward(self, x, y, last: bool):
        # megatron's DDP accumulates every micro-batch into its grad buffers; they are reduced once, in the step
        with self.autocast():
            loss = lm_loss(self.model(x), y)
        phase("forward")  # phase times of `moeflow bench train`; a no-op otherwise
        (loss / self.grad_accum).backward()  # the aux losses ride along via MoEAuxLossAutoScaler
        phase("backward")
        return loss, self.model.aux_loss().detach()

    def optimizer_step(self) -> torch.Tensor:
        """megatron DDP's gradient sync (once per step), clipping with every shard counted once (the plan),
        AdamW, schedule; the pre-clip gradient norm (a device tensor: the loop reads it when it logs)."""
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        names, params = zip(*self.gpt.named_parameters())
        if self.ddp is not None:
            self.ddp.finish_grad_sync()
            for p in params:  # torch AdamW reads .grad: the reduced buffer, no copy
                if p.requires_grad:
                    p.grad = p.main_grad
        norm = clip_grad_norm_(params, clip, copies=[self.plan.copies(n, p) for n, p in zip(names, params)])
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ddp is not None:
            self.ddp.zero_grad_buffer()
        return norm.detach()

    # -- checkpoints (launch/resume.py) -------------------------------------------------
    def checkpoint_state(self, with_optimizer: bool = True) -> dict:
        """moeflow-layout weights and the megatron-ordered AdamW moments, gathered to all experts and
        TP slices (collective; every rank holds the same full tensors, written once)."""
        state = {
            "model": mck.from_megatron(self.plan.full_state(self.gpt, unique_state_dict(self.gpt)), self.model_cfg)
        }
        if with_optimizer:
            from torch.distributed.checkpoint.state_dict import _init_optim_state

            _init_optim_state(self.opt)  # moments exist before the first step, for a resume to fill them
            osd = self.plan.full_optimizer_state(self.gpt, self.opt)
            state["megatron_optim"] = {str(i): v for i, v in osd["state"].items()}
        return state

    def schedule_state(self) -> dict:
        return {}  # the schedule is replayed to the step (the param groups differ from engine=torch's)

    def load_checkpoint_state(self, state: dict | None, trainer_state: dict | None) -> None:
        if state is not None:
            load_moeflow_weights(self.gpt, self.plan, state["model"], self.model_cfg)
            if "megatron_optim" in state:
                full = {
                    "state": {int(i): v for i, v in state["megatron_optim"].items()},
                    "param_groups": self.opt.state_dict()["param_groups"],
                }
                self.opt.load_state_dict(
                    self.plan.local_optimizer_state(self.gpt, self.opt, full)
                )  # this rank's shards
        if trainer_state is not None:
            replay_schedule(self.sched, int(trainer_state["step"]))

    def load_full_weights(self, weights: dict) -> None:
        load_moeflow_weights(self.gpt, self.plan, weights, self.model_cfg)

    def close(self) -> None:
        from megatron.core import parallel_state as ps

        super().close()  # an async save in flight is committed
        ps.destroy_model_parallel()


def initial_weights(model_cfg: ModelConfig, device: torch.device) -> dict:
    """engine=torch's initial weights: built on meta and initialised on `device` as it does (each tensor's
    random stream is the device's: the same seed gives other numbers on a GPU than on the CPU)."""
    from moeflow.parallel.parallelize import materialize

    with torch.device("meta"):
        model = Transformer(model_cfg)
    materialize(model, device)
    return unique_state_dict(model)


def load_moeflow_weights(gpt, plan, state: dict, model_cfg) -> None:
    device = next(gpt.parameters()).device
    full = {k: v.to(device) for k, v in mck.to_megatron(state, model_cfg, native=False).items()}
    missing, unexpected = gpt.load_state_dict(plan.local_state(full), strict=False)  # sliced to this rank's shards
    bad = [k for k in missing if not k.endswith("_extra_state")] + list(unexpected)
    if bad:
        raise CheckpointError(
            f"moeflow weights do not fit the megatron model (e.g. {bad[:3]}); resume with the checkpoint's model config"
        )
