"""`moeflow train engine=megatron`: train a megatron-core GPTModel whose MoE layers are moeflow's.

`MegatronEngine` is the engine object `train.train`'s loop drives (data, logging, eval,
checkpoint cadence, preemption and Ray hooks are the loop's, shared by every engine).
The model comes from `moeflow.parallel.integrations.megatron_core.build_gpt_model` (the
moeflow layer spec), starts from exactly the weights the torch engine would initialise
(same seed, converted), and trains with the same data, AdamW, schedule, clipping and
logging as `train.py`. The gates' aux losses reach the gradients through megatron-core's
`MoEAuxLossAutoScaler` (scaled by 1/grad_accum like the main loss). Checkpoints are moeflow
checkpoints (weights converted back to the moeflow layout), so engine=torch can resume
them (with fresh AdamW moments) and `moeflow convert` exports them. Needs CUDA: see
`megatron_core.CPU_MESSAGE`.

Expert parallelism (`parallel.ep` > 1) is megatron-core's `expert_model_parallel_size`: each
MoE slot keeps its EP rank's experts and routes over parallel_state's expert group
(`megatron_core.shard_over_expert_group`). The step is engine=torch's (`train.AdamWStep`)
with `megatron_core.data_parallel`, moeflow's `ExpertDataParallel` over parallel_state's
groups. Checkpoints gather the expert shards (written full, like one process would) and
resume on any EP size.

Tensor parallelism (`engine.tensor_parallel` > 1, sequence parallelism off) is megatron-core's
own for attention, embedding and output layer (logits gathered over the vocab), and
`megatron_core.shard_over_tensor_group` for the MoE slots (experts split on their hidden
dim). The ranks of a TP group train on the same batch (parallel_state's data-parallel rank);
checkpoints gather every TP slice too, so they stay single-process checkpoints.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from moeflow.moe.model import Transformer
from moeflow.parallel.distributed import DistEnv
from moeflow.parallel.expert_parallel import ddp_device_kwargs
from moeflow.parallel.expert_params import param_groups
from moeflow.parallel.integrations import megatron_ckpt as mck, torch_engine_optimizer_state
from moeflow.parallel.integrations import megatron_core as mcore
from moeflow.parallel.sharded_state import full_model_state, full_optimizer_state, local_model_state, local_optimizer_state

from . import checkpoint as ckpt
from .train import AdamWStep, bf16_autocast, build_scheduler, grad_sync, lm_loss, start_distributed

log = logging.getLogger("moeflow.train")


def start_megatron(cfg: DictConfig, tc) -> tuple[DistEnv, torch.device]:
    """Join the process group like engine=torch, then megatron-core's parallel_state (TP, EP groups)."""
    env, device = start_distributed(tc, cfg.parallel.backend)  # CUDA: validate() refused CPU (tests build on CPU)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mcore.initialize_parallel_state(tc.seed, tensor_parallel=int(cfg.engine.tensor_parallel), expert_parallel=int(cfg.parallel.ep))
    return env, device


class MegatronEngine(AdamWStep):
    """The engine object `train.train` drives (see `train.TorchEngine` for the interface); its
    optimizer step (expert-shard gradient sync, clipping, AdamW) is engine=torch's."""

    start = staticmethod(start_megatron)

    def __init__(self, cfg: DictConfig, model_cfg, tc, env: DistEnv, device: torch.device, run_dir: Path):
        from megatron.core import parallel_state as ps
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        self.cfg, self.model_cfg, self.env, self.device, self.run_dir, self.grad_accum = cfg, model_cfg, env, device, run_dir, tc.grad_accum
        self.use_bf16, self.autocast = bf16_autocast(tc, device)
        init = ckpt.unique_state_dict(Transformer(model_cfg))  # the torch engine's initial weights, same seed
        self.gpt = mcore.build_gpt_model(model_cfg, device)  # with parallel.ep > 1: this EP rank's experts only
        self.model = self.eval_model = mcore.MegatronLM(self.gpt)
        self.opt = torch.optim.AdamW(param_groups(self.gpt, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        self.sched = build_scheduler(self.opt, cfg.optim, tc.steps)
        self.start_step, init = resume_if_asked(cfg, run_dir, model_cfg, self.opt, self.sched, init)
        load_moeflow_weights(self.gpt, init, model_cfg)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / tc.grad_accum, device=device))
        # dense grads averaged over parallel_state's data-parallel group, expert shards over its expert-data-parallel group
        self.ddp = mcore.data_parallel(self.model, **ddp_device_kwargs(device)) if env.enabled else None
        # (rank, size) of parallel_state's data-parallel group: the ranks of one TP group train on the same batch
        self.data_parallel_rank = (ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()) if env.enabled else (0, 1)
        self.data_parallel_group = ps.get_data_parallel_group() if env.enabled else None  # routing stats: each batch once

    def describe(self) -> str:
        return (f"engine megatron: megatron-core GPTModel with {len(self.model.moe_layers())} moeflow MoE layers, "
                f"{sum(p.numel() for p in self.gpt.parameters()) / 1e6:.2f}M parameters, {'bf16' if self.use_bf16 else 'fp32'}, world {self.env.world_size}")

    def forward_backward(self, x, y, last: bool):
        with grad_sync(self.ddp, last):
            with self.autocast():
                loss = lm_loss((self.ddp or self.model)(x), y)
            (loss / self.grad_accum).backward()  # the aux losses ride along via MoEAuxLossAutoScaler
        return loss, self.model.aux_loss().detach()

    def save(self, step: int) -> Path | None:
        return save(self.run_dir, step, self.gpt, self.model_cfg, self.opt, self.sched, self.cfg, self.env)

    def close(self) -> None:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()


def load_moeflow_weights(gpt, state: dict, model_cfg) -> None:
    device = next(gpt.parameters()).device
    full = {k: v.to(device) for k, v in mck.to_megatron(state, model_cfg, native=False).items()}
    missing, unexpected = gpt.load_state_dict(local_model_state(gpt, full), strict=False)  # sliced to this EP rank's experts
    bad = [k for k in missing if not k.endswith("_extra_state")] + list(unexpected)
    if bad:
        raise ckpt.CheckpointError(f"moeflow weights do not fit the megatron model (e.g. {bad[:3]}); resume with the checkpoint's model config")


def save(run_dir: Path, step: int, gpt, model_cfg, opt, sched, cfg: DictConfig, env: DistEnv) -> Path | None:
    """A moeflow checkpoint: weights in moeflow's layout; the megatron-ordered AdamW state under its own key.
    Expert shards and their moments are gathered to all experts first (collective: every rank calls it)."""
    weights, megatron_opt = full_model_state(gpt), full_optimizer_state(gpt, opt)
    if not env.is_main:
        return None
    torch_opt, torch_sched = torch_engine_optimizer_state(model_cfg, cfg.optim, cfg.trainer.steps, step)  # for engine=torch
    state = {"optimizer": torch_opt, "scheduler": torch_sched, "megatron_optimizer": megatron_opt,
             "rng": ckpt.rng_state(), "step": step, "engine": "megatron"}
    meta = {"model": model_cfg.to_dict(), "config": OmegaConf.to_container(cfg, resolve=True), "engine": "megatron"}
    path = ckpt.save_checkpoint(run_dir, step, mck.from_megatron(weights, model_cfg), state, meta, cfg.trainer.keep_checkpoints)
    log.info("saved checkpoint %s", path)
    return path


def resume_if_asked(cfg: DictConfig, run_dir: Path, model_cfg, opt, sched, init: dict) -> tuple[int, dict]:
    if cfg.resume is None:
        return 0, init
    where = run_dir if cfg.resume == "auto" else Path(str(cfg.resume)).expanduser()
    found = ckpt.find_checkpoint(where)
    if found is None:
        if cfg.resume == "auto":
            return 0, init
        raise ckpt.CheckpointError(f"resume={cfg.resume}: no checkpoint found there; pass a run dir with checkpoints/ or a checkpoint dir")
    meta = ckpt.read_meta(found)
    state = ckpt.load_model_state(found)
    ckpt.check_compatible(found, meta.get("model", {}), model_cfg.to_dict(), state, Transformer(model_cfg))
    trainer_state = ckpt.load_trainer_state(found)
    if "megatron_optimizer" in trainer_state:
        opt.load_state_dict(local_optimizer_state(opt, trainer_state["megatron_optimizer"]))  # this EP rank's expert moments
    else:
        log.warning("checkpoint %s was not written by engine=megatron: AdamW moments start from zero", found)
    step = int(trainer_state["step"])
    with warnings.catch_warnings():  # replay the schedule: valid whatever engine wrote the checkpoint (group counts differ)
        warnings.simplefilter("ignore")
        for _ in range(step):
            sched.step()
    ckpt.set_rng_state(trainer_state["rng"])
    log.info("resumed from %s at step %d", found, step)
    return step, state
