"""`moeflow train engine=deepspeed`: the training loop with DeepSpeed as the engine.

Same data, model, schedule, logging and evaluation as `train.py`; what changes is who
owns the step: `engine.backward` (loss scaling by 1/grad_accum, ZeRO gradient
reduction), `engine.step` (clipping, optimizer, scheduler, only on the accumulation
boundary) and DeepSpeed checkpoints. Launch several processes with torchrun (or
`deepspeed`); the process group is joined the same way as the torch engine.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from moeflow.moe.model import Transformer
from moeflow.parallel.distributed import DistEnv, init_distributed, shutdown_distributed
from moeflow.parallel.integrations import deepspeed_engine as dse

from .config import resolve_device, validate
from .data import training_samplers
from .train import build_scheduler, evaluate, lm_loss, log_routing, set_gate_step

log = logging.getLogger("moeflow.train")


def train(cfg: DictConfig, run_dir: Path) -> dict:
    model_cfg, tc = validate(cfg)
    device = resolve_device(tc.device)
    env: DistEnv = init_distributed(device.type, cfg.parallel.backend)
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    no_autocast = lambda: torch.autocast(device.type, enabled=False)  # noqa: E731  (DeepSpeed casts the model itself)

    torch.manual_seed(tc.seed)
    splits, train_data, val_data = training_samplers(cfg.data, model_cfg.vocab_size, tc.seed)

    model = Transformer(model_cfg).to(device)
    engine, sched = dse.initialize(model, cfg, use_bf16, build_scheduler)
    start_step = dse.resume(engine, cfg, run_dir)
    model_dtype = next(engine.module.parameters()).dtype

    writer = SummaryWriter(str(run_dir / "tensorboard")) if env.is_main else None
    stats_file = open(run_dir / "routing_stats.jsonl", "a") if env.is_main else None
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * tc.grad_accum * env.world_size
    if env.is_main:
        log.info("data: %s; model: %.2fM parameters, device %s, world %d, engine deepspeed", splits.description, model.num_params() / 1e6, device, env.world_size)
        if start_step == 0 and tc.eval_every > 0:
            log.info("step 0: val loss %.4f", evaluate(engine, val_data, tc.eval_batches, device, no_autocast, 0))

    bar = tqdm(total=tc.steps, initial=start_step, disable=not (tc.progress and env.is_main), desc="train", mininterval=1.0, dynamic_ncols=True)
    result = {"start_step": start_step}
    t_last, tokens_since = time.perf_counter(), 0
    for step in range(start_step, tc.steps):
        set_gate_step(model, step)
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            x, y = train_data.batch(step, micro, env.rank)
            loss = lm_loss(engine(x.to(device)), y.to(device))
            aux = model.aux_loss().to(device=loss.device, dtype=loss.dtype)
            engine.backward(loss + aux)  # DeepSpeed divides by grad_accum
            engine.step()  # steps optimizer + scheduler only at the accumulation boundary
            loss_sum += loss.item()
        done = step + 1
        train_loss = loss_sum / tc.grad_accum
        tokens_since += tokens_per_step
        result.update(step=done, train_loss=train_loss)

        if env.is_main and (done % tc.log_every == 0 or done == tc.steps):
            elapsed = time.perf_counter() - t_last
            tok_s = tokens_since / max(elapsed, 1e-9)
            t_last, tokens_since = time.perf_counter(), 0
            grad_norm = engine.get_global_grad_norm()
            scalars = {"train/loss": train_loss, "train/aux_loss": aux.item(), "train/lr": sched.get_last_lr()[0], "train/tokens_per_s": tok_s}
            if grad_norm is not None:
                scalars["train/grad_norm"] = float(grad_norm)
            for k, v in scalars.items():
                writer.add_scalar(k, v, done)
            log_routing(writer, stats_file, model, done)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}")
        if tc.eval_every > 0 and (done % tc.eval_every == 0 or done == tc.steps):
            # every rank evaluates: under ZeRO-3 the forward gathers parameters collectively
            val = evaluate(engine, val_data, tc.eval_batches, device, no_autocast, 0)
            if env.is_main:
                writer.add_scalar("val/loss", val, done)
                log.info("step %d: train loss %.4f, val loss %.4f", done, train_loss, val)
            result["val_loss"] = val
        if tc.ckpt_every > 0 and (done % tc.ckpt_every == 0 or done == tc.steps):
            path = dse.save(engine, run_dir, done, cfg, model_cfg.to_dict(), env.is_main)
            if env.is_main:
                log.info("saved DeepSpeed checkpoint %s", path)
        bar.update(1)
    bar.close()
    if writer is not None:
        writer.close()
    if stats_file is not None:
        stats_file.close()
    result["param_dtype"] = str(model_dtype)
    shutdown_distributed()
    return result
