"""engine=deepspeed: DeepSpeed owns the step; the loop is `launch/train.py`'s.

What changes against engine=torch is who does the step: `engine.backward` in
`forward_backward` (loss scaling by 1/grad_accum, ZeRO gradient reduction on the step's last
micro-batch, which `set_gradient_accumulation_boundary` marks), `engine.step` in
`optimizer_step` (clipping, optimizer, scheduler, once per step) and DeepSpeed checkpoints.
Launch several processes with torchrun (or `deepspeed`); the process group is joined the same
way as the torch engine.

Everything DeepSpeed-specific lives in this module and the deepspeed_* modules beside it, one
job each: `deepspeed_config` (the DeepSpeed JSON generated from the Hydra config and merged
with a user's, the option checks), `deepspeed_groups` (expert parallelism: DeepSpeed's MoE
groups), `deepspeed_checkpoint` (DeepSpeed checkpoints: save, find, resume),
`deepspeed_convert` (consolidation into a moeflow checkpoint) and `deepspeed_ops` (its
JIT-built ops and the build locks a killed build leaves); this module builds the engine
(`deepspeed.initialize`) and steps it. With expert parallelism (`parallel.ep > 1`, ZeRO-1/2, CPU optimizer offload too) moeflow
shards the experts and routes through its all-to-all dispatcher, and DeepSpeed's MoE
machinery reduces and ZeRO-partitions the expert groups over the expert-data-parallel
groups (`shard_experts_for_deepspeed`, `_deepspeed_moe_marker`).

The DeepSpeed config is generated from the Hydra config (micro-batch, grad accumulation,
clipping, ZeRO stage, CPU optimizer offload, bf16) and a user JSON (`engine.config_file`)
is merged over it, so anything DeepSpeed offers stays reachable. The optimizer is
moeflow's AdamW over `launch.optim.optimizer_groups`: expert parameters sit
in their own groups, which is what lets ZeRO shard them over the expert-data-parallel
group instead of the whole world once experts are sharded over EP (DeepSpeed-MoE's
`moe: True` groups, see `to_deepspeed_moe_groups`).

Checkpoints are DeepSpeed's own (`<run>/checkpoints/deepspeed/step_XXXXXXXX/`, plus a
meta.json with the model config); `convert_to_moeflow` consolidates one (any ZeRO stage)
into a moeflow safetensors checkpoint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from moeflow.moe.model import Transformer
from moeflow.parallel.distributed import DistEnv
from moeflow.parallel.plan import ParallelPlan, is_expert

from ..config import parallel_config
from ..losses import lm_loss
from ..optim import build_scheduler, optimizer_groups
from ..profiling import phase
from ..runtime import bf16_autocast, start_distributed
from .contract import Engine
from .deepspeed_checkpoint import resume, save
from .deepspeed_config import check_options, deepspeed_config
from .deepspeed_convert import convert_to_moeflow
from .deepspeed_groups import shard_experts_for_deepspeed, to_deepspeed_moe_groups
from .deepspeed_ops import STALE_AFTER_S, build_ops, clear_stale_build_lock

__all__ = [
    "DeepSpeedEngine",
    "initialize",  # and, for their callers (engines.check_engine, moeflow convert/prepare), re-exported:
    "check_options",
    "deepspeed_config",
    "convert_to_moeflow",
    "to_deepspeed_moe_groups",
    "STALE_AFTER_S",
    "build_ops",
    "clear_stale_build_lock",
]

log = logging.getLogger("moeflow.deepspeed")


def initialize(model: torch.nn.Module, cfg: DictConfig, use_bf16: bool):
    """`deepspeed.initialize` with moeflow's AdamW and schedule; returns (engine, scheduler, plan)."""
    import deepspeed
    import torch.distributed as dist

    build_ops(progress=log.info)  # before DeepSpeed's own comm setup loads them: moeflow's guard against stale locks
    if not dist.is_initialized():  # one process: a private group, or DeepSpeed goes looking for MPI
        backend = "nccl" if next(model.parameters()).is_cuda else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it is set (torchrun sets it)
    parallel = parallel_config(cfg)
    ep = parallel.ep
    plan = ParallelPlan()
    if dist.get_world_size() > 1 or ep > 1:  # like engine=torch: routing statistics and aux losses of the global batch
        plan = shard_experts_for_deepspeed(model, parallel, next(model.parameters()).device.type)
    o = cfg.optim
    groups = optimizer_groups(model, o.weight_decay)
    if ep > 1:
        groups = to_deepspeed_moe_groups(groups, ep)
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    sched = build_scheduler(opt, o, cfg.trainer.steps)
    config = deepspeed_config(cfg, use_bf16)
    engine, _, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=config)
    n_expert = sum(plan.global_numel(n, p) for n, p in model.named_parameters() if is_expert(n))
    log.info(
        "deepspeed: ZeRO stage %d%s, bf16 %s, %d param groups (%.2fM expert params in their own groups%s)",
        config["zero_optimization"]["stage"],
        " + CPU optimizer offload" if "offload_optimizer" in config["zero_optimization"] else "",
        config["bf16"]["enabled"],
        len(groups),
        n_expert / 1e6,
        f", sharded over EP={ep} and ZeRO-partitioned over the expert-data-parallel group" if ep > 1 else "",
    )
    return engine, sched, plan


class DeepSpeedEngine(Engine):
    """The engine contract (`contract.Engine`); DeepSpeed owns backward, step and checkpoints."""

    name = "deepspeed"

    start = staticmethod(lambda cfg, trainer_cfg: start_distributed(trainer_cfg, cfg.parallel.backend))

    def __init__(self, cfg: DictConfig, model_cfg, trainer_cfg, env: DistEnv, device: torch.device, run_dir: Path):
        self.cfg, self.model_cfg, self.env, self.device, self.run_dir = cfg, model_cfg, env, device, run_dir
        use_bf16, _ = bf16_autocast(trainer_cfg, device)
        self.autocast = lambda: torch.autocast(device.type, enabled=False)  # noqa: E731  (DeepSpeed casts the model itself)
        self.model = Transformer(model_cfg).to(device)
        self.engine, self.sched, self.plan = initialize(self.model, cfg, use_bf16)
        self.data_parallel_rank, self.data_parallel_group = (env.rank, env.world_size), None
        self.eval_model = self.engine  # under ZeRO-3 the engine's forward gathers the partitioned parameters
        self.start_step = resume(self.engine, cfg, run_dir)

    def describe(self) -> str:
        n = sum(self.plan.global_numel(k, p) for k, p in self.model.named_parameters())
        return f"model: {n / 1e6:.2f}M parameters, device {self.device}, world {self.env.world_size}, engine deepspeed"

    def forward_backward(self, x, y, last: bool):
        # the step's last micro-batch is the accumulation boundary (ZeRO reduces there), whatever DeepSpeed's micro-step count says
        self.engine.set_gradient_accumulation_boundary(last)
        loss = lm_loss(self.engine(x), y)
        aux = self.model.aux_loss().to(device=loss.device, dtype=loss.dtype)
        phase("forward")  # phase times of `moeflow bench train`; a no-op otherwise
        self.engine.backward(loss + aux)  # DeepSpeed divides by grad_accum
        phase("backward")
        return loss, aux

    def optimizer_step(self) -> torch.Tensor | None:
        """DeepSpeed's step (clipping, optimizer, scheduler) once per step, at the boundary the last
        micro-batch set; its global gradient norm as a tensor (None without clipping), not read here."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None or isinstance(norm, torch.Tensor):
            return norm
        return torch.tensor(
            float(norm)
        )  # a host number already (some of its optimizers keep one): wrapped, as every engine returns a tensor

    def save(self, step: int) -> Path:
        path = save(self.engine, self.run_dir, step, self.cfg, self.model_cfg.to_dict(), self.env.is_main)
        if self.env.is_main:
            log.info("saved DeepSpeed checkpoint %s", path)
        return path

    def extra_result(self) -> dict:
        return {"param_dtype": str(next(self.engine.module.parameters()).dtype)}
