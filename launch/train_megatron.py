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
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from moeflow.moe.model import Transformer
from moeflow.parallel.distributed import DistEnv, init_distributed
from moeflow.parallel.expert_params import param_groups
from moeflow.parallel.integrations import megatron_ckpt as mck, torch_engine_optimizer_state
from moeflow.parallel.integrations import megatron_core as mcore

from . import checkpoint as ckpt
from .train import build_scheduler, clip_and_step, grad_sync, lm_loss

log = logging.getLogger("moeflow.train")


def start_megatron(cfg: DictConfig, tc) -> tuple[DistEnv, torch.device]:
    env = init_distributed("cuda", cfg.parallel.backend)  # validate() refused CPU with the reason
    device = torch.device("cuda", env.local_rank)
    torch.cuda.set_device(device)
    mcore.initialize_parallel_state(tc.seed, tensor_parallel=int(cfg.engine.tensor_parallel))
    return env, device


class MegatronEngine:
    """The engine object `train.train` drives (see `train.TorchEngine` for the interface)."""

    start = staticmethod(start_megatron)

    def __init__(self, cfg: DictConfig, model_cfg, tc, env: DistEnv, device: torch.device, run_dir: Path):
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

        self.cfg, self.model_cfg, self.env, self.device, self.run_dir, self.grad_accum = cfg, model_cfg, env, device, run_dir, tc.grad_accum
        self.use_bf16 = tc.precision in ("bf16", "auto")
        self.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.use_bf16)  # noqa: E731
        init = ckpt.unique_state_dict(Transformer(model_cfg))  # the torch engine's initial weights, same seed
        self.gpt = mcore.build_gpt_model(model_cfg, device)
        self.model = self.eval_model = mcore.MegatronLM(self.gpt)
        self.opt = torch.optim.AdamW(param_groups(self.gpt, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        self.sched = build_scheduler(self.opt, cfg.optim, tc.steps)
        self.start_step, init = resume_if_asked(cfg, run_dir, model_cfg, self.opt, self.sched, init)
        load_moeflow_weights(self.gpt, init, model_cfg)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / tc.grad_accum, device=device))
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[env.local_rank]) if env.enabled else None

    def describe(self) -> str:
        return (f"engine megatron: megatron-core GPTModel with {len(self.model.moe_layers())} moeflow MoE layers, "
                f"{sum(p.numel() for p in self.gpt.parameters()) / 1e6:.2f}M parameters, {'bf16' if self.use_bf16 else 'fp32'}, world {self.env.world_size}")

    def forward_backward(self, x, y, last: bool):
        with grad_sync(self.ddp, last):
            with self.autocast():
                loss = lm_loss((self.ddp or self.model)(x), y)
            (loss / self.grad_accum).backward()  # the aux losses ride along via MoEAuxLossAutoScaler
        return loss, self.model.aux_loss().detach()

    def optimizer_step(self) -> float:
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        return clip_and_step(self.opt, self.sched, lambda: torch.nn.utils.clip_grad_norm_(self.gpt.parameters(), clip))

    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def save(self, step: int) -> Path | None:
        return save(self.run_dir, step, self.gpt, self.model_cfg, self.opt, self.sched, self.cfg) if self.env.is_main else None

    def extra_result(self) -> dict:
        return {}

    def close(self) -> None:
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()


def load_moeflow_weights(gpt, state: dict, model_cfg) -> None:
    device = next(gpt.parameters()).device
    missing, unexpected = gpt.load_state_dict({k: v.to(device) for k, v in mck.to_megatron(state, model_cfg, native=False).items()}, strict=False)
    bad = [k for k in missing if not k.endswith("_extra_state")] + list(unexpected)
    if bad:
        raise ckpt.CheckpointError(f"moeflow weights do not fit the megatron model (e.g. {bad[:3]}); resume with the checkpoint's model config")


def save(run_dir: Path, step: int, gpt, model_cfg, opt, sched, cfg: DictConfig) -> Path:
    """A moeflow checkpoint: weights in moeflow's layout; the megatron-ordered AdamW state under its own key."""
    torch_opt, torch_sched = torch_engine_optimizer_state(model_cfg, cfg.optim, cfg.trainer.steps, step)  # for engine=torch
    state = {"optimizer": torch_opt, "scheduler": torch_sched, "megatron_optimizer": opt.state_dict(),
             "rng": ckpt.rng_state(), "step": step, "engine": "megatron"}
    meta = {"model": model_cfg.to_dict(), "config": OmegaConf.to_container(cfg, resolve=True), "engine": "megatron"}
    weights = {k: v.detach().cpu() for k, v in mck.from_megatron(gpt.state_dict(), model_cfg).items()}
    path = ckpt.save_checkpoint(run_dir, step, weights, state, meta, cfg.trainer.keep_checkpoints)
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
        opt.load_state_dict(trainer_state["megatron_optimizer"])
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
