"""`moeflow train engine=megatron`: train a megatron-core GPTModel whose MoE layers are moeflow's.

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

import contextlib
import logging
import time
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from moeflow.moe.model import Transformer
from moeflow.parallel.distributed import DistEnv, init_distributed, shutdown_distributed
from moeflow.parallel.expert_params import param_groups
from moeflow.parallel.integrations import megatron_ckpt as mck, torch_engine_optimizer_state
from moeflow.parallel.integrations import megatron_core as mcore

from . import checkpoint as ckpt
from .config import validate
from .data import training_samplers
from .train import build_scheduler, evaluate, lm_loss, log_routing, set_gate_step

log = logging.getLogger("moeflow.train")


def train(cfg: DictConfig, run_dir: Path) -> dict:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    model_cfg, tc = validate(cfg)  # refuses CPU and TP/EP it cannot run, with the reason
    env: DistEnv = init_distributed("cuda", cfg.parallel.backend)
    device = torch.device("cuda", env.local_rank)
    torch.cuda.set_device(device)
    mcore.initialize_parallel_state(tc.seed, tensor_parallel=int(cfg.engine.tensor_parallel))
    use_bf16 = tc.precision in ("bf16", "auto")
    autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16)  # noqa: E731

    torch.manual_seed(tc.seed)
    splits, train_data, val_data = training_samplers(cfg.data, model_cfg.vocab_size, tc.seed)

    init = ckpt.unique_state_dict(Transformer(model_cfg))  # the torch engine's initial weights, same seed
    gpt = mcore.build_gpt_model(model_cfg, device)
    model = mcore.MegatronLM(gpt)
    opt = torch.optim.AdamW(param_groups(gpt, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    sched = build_scheduler(opt, cfg.optim, tc.steps)
    start_step, init = resume_if_asked(cfg, run_dir, model_cfg, opt, sched, init)
    load_moeflow_weights(gpt, init, model_cfg)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / tc.grad_accum, device=device))
    fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank]) if env.enabled else model

    writer = SummaryWriter(str(run_dir / "tensorboard")) if env.is_main else None
    stats_file = open(run_dir / "routing_stats.jsonl", "a") if env.is_main else None
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * tc.grad_accum * env.world_size
    if env.is_main:
        log.info("engine megatron: megatron-core GPTModel with %d moeflow MoE layers, %.2fM parameters, %s, world %d",
                 len(model.moe_layers()), sum(p.numel() for p in gpt.parameters()) / 1e6, "bf16" if use_bf16 else "fp32", env.world_size)
        if start_step == 0 and tc.eval_every > 0:
            log.info("step 0: val loss %.4f", evaluate(model, val_data, tc.eval_batches, device, autocast, 0))

    bar = tqdm(total=tc.steps, initial=start_step, disable=not (tc.progress and env.is_main), desc="train", mininterval=1.0, dynamic_ncols=True)
    result = {"start_step": start_step}
    t_last, tokens_since = time.perf_counter(), 0
    for step in range(start_step, tc.steps):
        set_gate_step(model, step)
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            x, y = train_data.batch(step, micro, env.rank)
            sync = contextlib.nullcontext() if (not env.enabled or micro == tc.grad_accum - 1) else fwd.no_sync()
            with sync:
                with autocast():
                    loss = lm_loss(fwd(x.to(device)), y.to(device))
                (loss / tc.grad_accum).backward()  # the aux losses ride along via MoEAuxLossAutoScaler
            loss_sum += loss.item()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(gpt.parameters(), clip).item()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        train_loss = loss_sum / tc.grad_accum
        tokens_since += tokens_per_step
        result.update(step=done, train_loss=train_loss)
        if env.is_main and (done % tc.log_every == 0 or done == tc.steps):
            elapsed = time.perf_counter() - t_last
            tok_s = tokens_since / max(elapsed, 1e-9)
            t_last, tokens_since = time.perf_counter(), 0
            for k, v in {"train/loss": train_loss, "train/aux_loss": model.aux_loss().item(), "train/lr": sched.get_last_lr()[0], "train/grad_norm": grad_norm, "train/tokens_per_s": tok_s}.items():
                writer.add_scalar(k, v, done)
            log_routing(writer, stats_file, model, done)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}")
        if env.is_main and tc.eval_every > 0 and (done % tc.eval_every == 0 or done == tc.steps):
            val = evaluate(model, val_data, tc.eval_batches, device, autocast, 0)
            writer.add_scalar("val/loss", val, done)
            result["val_loss"] = val
            log.info("step %d: train loss %.4f, val loss %.4f", done, train_loss, val)
        if env.is_main and tc.ckpt_every > 0 and (done % tc.ckpt_every == 0 or done == tc.steps):
            save(run_dir, done, gpt, model_cfg, opt, sched, cfg)
        bar.update(1)
    bar.close()
    if writer is not None:
        writer.close()
    if stats_file is not None:
        stats_file.close()
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    shutdown_distributed()
    return result


def load_moeflow_weights(gpt, state: dict, model_cfg) -> None:
    device = next(gpt.parameters()).device
    missing, unexpected = gpt.load_state_dict({k: v.to(device) for k, v in mck.to_megatron(state, model_cfg, native=False).items()}, strict=False)
    bad = [k for k in missing if not k.endswith("_extra_state")] + list(unexpected)
    if bad:
        raise ckpt.CheckpointError(f"moeflow weights do not fit the megatron model (e.g. {bad[:3]}); resume with the checkpoint's model config")


def save(run_dir: Path, step: int, gpt, model_cfg, opt, sched, cfg: DictConfig) -> None:
    """A moeflow checkpoint: weights in moeflow's layout; the megatron-ordered AdamW state under its own key."""
    torch_opt, torch_sched = torch_engine_optimizer_state(model_cfg, cfg.optim, cfg.trainer.steps, step)  # for engine=torch
    state = {"optimizer": torch_opt, "scheduler": torch_sched, "megatron_optimizer": opt.state_dict(),
             "rng": ckpt.rng_state(), "step": step, "engine": "megatron"}
    meta = {"model": model_cfg.to_dict(), "config": OmegaConf.to_container(cfg, resolve=True), "engine": "megatron"}
    weights = {k: v.detach().cpu() for k, v in mck.from_megatron(gpt.state_dict(), model_cfg).items()}
    path = ckpt.save_checkpoint(run_dir, step, weights, state, meta, cfg.trainer.keep_checkpoints)
    log.info("saved checkpoint %s", path)


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
