"""engine=torch: the reference step (autocast forward, backward, clip, AdamW, schedule).

Under torchrun the model is wrapped by `moeflow.parallel.parallelize` (DDP for dense
parameters, expert parallelism with `parallel.ep`). Checkpoints go through the one
moeflow-format path (`launch/resume.py`): full weights and optimizer moments (expert shards
gathered), so a run resumes with any EP size.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from omegaconf import DictConfig

from moeflow.moe.model import Transformer
from moeflow.parallel import parallelize_from_config
from moeflow.parallel.distributed import DistEnv
from moeflow.parallel.sharded_state import full_model_state, full_optimizer_state, local_model_state, local_optimizer_state

from .. import resume
from ..losses import lm_loss
from ..optim import AdamWStep, build_optimizer, build_scheduler
from ..runtime import bf16_autocast, start_distributed


def grad_sync(ddp, last: bool):
    """DDP all-reduces gradients on the last micro-batch of a step only (`no_sync` before it)."""
    return contextlib.nullcontext() if (ddp is None or last) else ddp.no_sync()


class TorchEngine(AdamWStep):
    """The engine interface every engine offers the loop in `launch/train.py`:

    - `start(cfg, trainer_cfg)` (class method): join the process group -> (DistEnv, device);
    - construction builds model, optimizer and schedule, and resumes if `cfg.resume` asks;
    - `model` (the moeflow modules: gates, aux loss, routing stats), `eval_model`, `autocast`,
      `start_step`, `data_parallel_rank` = (rank, size) of this rank's batch shard and
      `data_parallel_group` (None: the world);
    - `describe()`, `forward_backward(x, y, last) -> (loss, aux)`, `optimizer_step() -> grad
      norm or None`, `lr()`, `save(step) -> checkpoint dir (None on ranks that write none)`,
      `extra_result()`, `close()`.
    """

    start = staticmethod(lambda cfg, trainer_cfg: start_distributed(trainer_cfg, cfg.parallel.backend))

    def __init__(self, cfg: DictConfig, model_cfg, trainer_cfg, env: DistEnv, device: torch.device, run_dir: Path):
        self.cfg, self.model_cfg, self.env, self.device, self.run_dir, self.grad_accum = cfg, model_cfg, env, device, run_dir, trainer_cfg.grad_accum
        self.use_bf16, self.autocast = bf16_autocast(trainer_cfg, device)
        self.model = self.eval_model = Transformer(model_cfg).to(device)
        # DDP + expert parallelism (parallel.ep); before the optimizer, which then holds only this rank's expert shards.
        self.ddp = parallelize_from_config(self.model, cfg.parallel, device) if env.enabled else None
        self.data_parallel_rank, self.data_parallel_group = (env.rank, env.world_size), None
        self.opt = build_optimizer(self.model, cfg.optim)
        self.sched = build_scheduler(self.opt, cfg.optim, trainer_cfg.steps)
        self.start_step = resume.resume_run(self)
        wrapped = self.ddp or self.model
        self.fwd = torch.compile(wrapped) if trainer_cfg.compile else wrapped

    def describe(self) -> str:
        m = self.model
        return (f"model: {m.num_params() / 1e6:.2f}M parameters ({m.num_params(active_only=True) / 1e6:.2f}M active), "
                f"device {self.device}, {'bf16' if self.use_bf16 else 'fp32'}, world {self.env.world_size}")

    def forward_backward(self, x, y, last: bool):
        with grad_sync(self.ddp, last):
            with self.autocast():
                loss = lm_loss(self.fwd(x), y)
                aux = self.model.aux_loss().to(loss.device)
            ((loss + aux) / self.grad_accum).backward()
        return loss, aux

    # -- checkpoints (launch/resume.py) -------------------------------------------------
    def checkpoint_state(self, step: int):
        weights, opt_state = full_model_state(self.model), full_optimizer_state(self.model, self.opt)  # gathers expert shards (all ranks)
        return weights, {"optimizer": opt_state, "scheduler": self.sched.state_dict()}

    def load_checkpoint_state(self, weights: dict, trainer_state: dict | None) -> None:
        self.model.load_state_dict(local_model_state(self.model, weights), strict=False)  # this rank's expert shards
        if trainer_state is not None:
            self.opt.load_state_dict(local_optimizer_state(self.opt, trainer_state["optimizer"]))
            self.sched.load_state_dict(trainer_state["scheduler"])

    def save(self, step: int) -> Path | None:
        return resume.save_run(self, step, "torch")

    def extra_result(self) -> dict:
        return {}

    def close(self) -> None:
        pass
