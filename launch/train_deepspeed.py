"""`moeflow train engine=deepspeed`: DeepSpeed owns the step; the loop is `train.py`'s.

What changes against engine=torch is who does the step: `engine.backward` (loss scaling
by 1/grad_accum, ZeRO gradient reduction), `engine.step` (clipping, optimizer, scheduler,
only on the accumulation boundary; DeepSpeed counts micro-steps, so it is called after
every micro-batch) and DeepSpeed checkpoints. Launch several processes with torchrun (or
`deepspeed`); the process group is joined the same way as the torch engine.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from moeflow.moe.model import Transformer
from moeflow.parallel.distributed import DistEnv
from moeflow.parallel.integrations import deepspeed_engine as dse

from .train import bf16_autocast, build_scheduler, lm_loss, start_distributed

log = logging.getLogger("moeflow.train")


class DeepSpeedEngine:
    """The engine object `train.train` drives (see `train.TorchEngine` for the interface)."""

    start = staticmethod(lambda cfg, tc: start_distributed(tc, cfg.parallel.backend))

    def __init__(self, cfg: DictConfig, model_cfg, tc, env: DistEnv, device: torch.device, run_dir: Path):
        self.cfg, self.model_cfg, self.env, self.device, self.run_dir = cfg, model_cfg, env, device, run_dir
        use_bf16, _ = bf16_autocast(tc, device)
        self.autocast = lambda: torch.autocast(device.type, enabled=False)  # noqa: E731  (DeepSpeed casts the model itself)
        self.model = Transformer(model_cfg).to(device)
        self.engine, self.sched = dse.initialize(self.model, cfg, use_bf16, build_scheduler)
        self.eval_model = self.engine  # under ZeRO-3 the engine's forward gathers the partitioned parameters
        self.start_step = dse.resume(self.engine, cfg, run_dir)

    def describe(self) -> str:
        return f"model: {self.model.num_params() / 1e6:.2f}M parameters, device {self.device}, world {self.env.world_size}, engine deepspeed"

    def forward_backward(self, x, y, last: bool):
        loss = lm_loss(self.engine(x), y)
        aux = self.model.aux_loss().to(device=loss.device, dtype=loss.dtype)
        self.engine.backward(loss + aux)  # DeepSpeed divides by grad_accum
        self.engine.step()  # steps optimizer + scheduler only at the accumulation boundary
        return loss, aux

    def optimizer_step(self) -> float | None:
        norm = self.engine.get_global_grad_norm()  # engine.step() above already stepped
        return None if norm is None else float(norm)

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def save(self, step: int) -> Path:
        path = dse.save(self.engine, self.run_dir, step, self.cfg, self.model_cfg.to_dict(), self.env.is_main)
        if self.env.is_main:
            log.info("saved DeepSpeed checkpoint %s", path)
        return path

    def extra_result(self) -> dict:
        return {"param_dtype": str(next(self.engine.module.parameters()).dtype)}

    def close(self) -> None:
        pass
