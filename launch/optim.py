"""AdamW and its learning-rate schedule, built the same way for every engine."""
from __future__ import annotations

import math
import warnings

import torch
from omegaconf import DictConfig


def _placement(p: torch.Tensor) -> str:
    """Plain tensor, or a DTensor on a given mesh."""
    mesh = getattr(p, "device_mesh", None)
    return "plain" if mesh is None else f"dtensor{tuple(mesh.mesh_dim_names or ())}"


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups {dense, experts} x {decay: matrices, no decay: vectors}, empty ones dropped.

    AdamW makes one multi-tensor (foreach/fused) call per group, and one call cannot mix plain
    tensors with DTensors, nor DTensors of different meshes. Dense parameters all share one
    placement (FSDP's mesh, or none) and so do the experts (the expert mesh, or plain), but the
    two differ (a named transport in one process: dense DTensors, plain experts). Grouping by
    kind rather than by mesh keeps the groups the same on every mesh, which resharding a
    checkpoint's optimizer state needs."""
    from moeflow.parallel.expert_params import is_expert_param

    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((is_expert_param(name, p), p.dim() >= 2), []).append(p)
    out = []
    for (expert, decay), params in sorted(groups.items()):
        if len({_placement(p) for p in params}) > 1:
            raise RuntimeError(f"{'expert' if expert else 'dense'} parameters sit on different meshes {sorted({_placement(p) for p in params})}: "
                               "AdamW cannot step them in one group")
        out.append({"params": params, "weight_decay": weight_decay if decay else 0.0})
    return out


def build_optimizer(model: torch.nn.Module, o: DictConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only; fused on CUDA (one kernel per group, no temporaries
    of the parameters' size: the multi-tensor path allocates a sqrt of every second moment)."""
    groups = optimizer_groups(model, o.weight_decay)
    fused = all(p.is_cuda for g in groups for p in g["params"]) and any(g["params"] for g in groups)
    return torch.optim.AdamW(groups, lr=float(o.lr), betas=tuple(float(b) for b in o.betas), eps=float(o.eps), fused=fused or None)


def build_scheduler(opt: torch.optim.Optimizer, o: DictConfig, total_steps: int):
    """Linear warmup, then cosine decay to min_lr (or constant)."""
    floor = o.min_lr / o.lr

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, total_steps - o.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def replay_schedule(sched, steps: int) -> None:
    """Advance a schedule `steps` steps without optimizer steps (a resume whose moments did not survive)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping the schedule without optimizer steps, on purpose
        for _ in range(steps):
            sched.step()


def fresh_optimizer_state(model_cfg, optim_cfg, total_steps: int, step: int) -> tuple[dict, dict]:
    """(optimizer, scheduler) state dicts engine=torch resumes from at `step`: AdamW with zero
    moments (for checkpoints whose moments are in another engine's layout) and the schedule at `step`."""
    from moeflow.moe.model import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    opt = build_optimizer(model, optim_cfg)
    sched = build_scheduler(opt, optim_cfg, total_steps)
    replay_schedule(sched, step)
    return opt.state_dict(), sched.state_dict()


def clip_and_step(opt, sched, grad_norm_and_clip) -> float:
    """Clip (the callable returns the pre-clip global norm), step optimizer and schedule, clear grads."""
    grad_norm = grad_norm_and_clip().item()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


class AdamWStep:
    """The optimizer step engine=torch and engine=megatron share: torch AdamW and schedule on
    `self.model`'s parameters, gradients synced by `self.ddp` (moeflow's `ExpertDataParallel`,
    None in one process): expert shards reduced once per step, and the clipping norm counts
    every expert shard once. Subclasses set `cfg`, `model`, `ddp`, `opt`, `sched`."""

    def optimizer_step(self) -> float:
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        if self.ddp is None:
            return clip_and_step(self.opt, self.sched, lambda: torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.ddp.finish_grad_sync()  # expert grads: reduce once per step; the norm counts every expert shard once
        return clip_and_step(self.opt, self.sched, lambda: self.ddp.clip_grad_norm_(clip))

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]
