"""`moeflow train`: a Hydra app that trains the MoE LM, with one training loop for every engine.

`train()` reads top to bottom: validate config -> join the process group -> data -> engine
(model, optimizer, schedule, resume) -> loop of {micro-batches, optimizer step, log, eval,
checkpoint, preemption check}. The engine object owns only the step: `TorchEngine` here
(the reference), `DeepSpeedEngine` (train_deepspeed.py) and `MegatronEngine`
(train_megatron.py); so launcher hooks (Slurm preemption, Ray Train reports), logging and
evaluation behave the same under every engine. Everything the run writes (config,
train.log, TensorBoard events, routing_stats.jsonl, checkpoints) lands in Hydra's output dir.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from moeflow.moe.model import Transformer
from moeflow.parallel import parallelize_from_config
from moeflow.parallel.distributed import DistEnv, init_distributed, shutdown_distributed
from moeflow.parallel.expert_parallel import sync_routing_stats
from moeflow.parallel.integrations import engine_for, engine_name
from moeflow.parallel.sharded_state import full_model_state, full_optimizer_state, local_model_state, local_optimizer_state

from . import checkpoint as ckpt
from .config import ConfigError, resolve_device, validate
from .data import BatchSampler, DataError, training_samplers
from .run_hooks import RunHooks

log = logging.getLogger("moeflow.train")


def build_optimizer(model: torch.nn.Module, o: DictConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


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


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_BSV.float().flatten(0, 1), targets_BS.flatten())


@torch.no_grad()
def evaluate(model, sampler: BatchSampler, n_batches: int, device, autocast, rank: int) -> float:
    model.eval()
    losses = []
    for i in range(n_batches):
        x, y = sampler.batch(1_000_000, i, rank)  # fixed held-out batches, disjoint key space from training
        with autocast():
            losses.append(lm_loss(model(x.to(device)), y.to(device)).item())
    model.train()
    return sum(losses) / len(losses)


def log_routing(writer: SummaryWriter | None, stats_file, model: Transformer, step: int) -> None:
    rows = []
    for i, layer in enumerate(model.moe_layers()):
        s = layer.last_stats
        if not s:
            continue
        row = {"step": step, "layer": i}
        for k, v in s.items():
            row[k] = v.tolist() if v.dim() else v.item()
            if writer is not None and v.dim() == 0:
                writer.add_scalar(f"moe/layer{i}/{k}", v.item(), step)
        if writer is not None:
            writer.add_histogram(f"moe/layer{i}/tokens_per_expert", s["tokens_per_expert"], step)
        rows.append(row)
    if stats_file is not None:
        stats_file.write("".join(json.dumps(r) + "\n" for r in rows))
        stats_file.flush()


def set_gate_step(model: Transformer, step: int) -> None:
    for layer in model.moe_layers():
        layer.gate.set_step(step)


def start_distributed(tc, backend: str) -> tuple[DistEnv, torch.device]:
    """Join the process group (torchrun's env, else one process) and pick this rank's device."""
    device = resolve_device(tc.device)
    env = init_distributed(device.type, backend)
    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
    return env, device


def bf16_autocast(tc, device: torch.device):
    """(use bf16?, autocast context factory): bf16 when asked, or by default on CUDA; every engine's rule."""
    use_bf16 = tc.precision == "bf16" or (tc.precision == "auto" and device.type == "cuda")
    return use_bf16, lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def clip_and_step(opt, sched, grad_norm_and_clip) -> float:
    """Clip (the callable returns the pre-clip global norm), step optimizer and schedule, clear grads."""
    grad_norm = grad_norm_and_clip().item()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


def grad_sync(ddp, last: bool):
    """DDP all-reduces gradients on the last micro-batch of a step only (`no_sync` before it)."""
    return contextlib.nullcontext() if (ddp is None or last) else ddp.no_sync()


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

    def extra_result(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class TorchEngine(AdamWStep):
    """engine=torch, the reference step: autocast forward, backward, clip, AdamW, schedule.

    Under torchrun the model is wrapped by `moeflow.parallel.parallelize` (DDP for dense
    parameters, expert parallelism with `parallel.ep`). Every engine offers what the loop
    in `train()` uses: `model` (the moeflow modules: gates, aux loss, routing stats),
    `eval_model`, `autocast`, `start_step`, `describe()`, `forward_backward(x, y, last)`
    -> (loss, aux), `optimizer_step()` -> grad norm or None, `lr()`, `save(step)` -> the
    checkpoint dir (None on ranks that do not write one), `extra_result()`, `close()`.
    """

    start = staticmethod(lambda cfg, tc: start_distributed(tc, cfg.parallel.backend))

    def __init__(self, cfg: DictConfig, model_cfg, tc, env: DistEnv, device: torch.device, run_dir: Path):
        self.cfg, self.env, self.device, self.run_dir, self.grad_accum = cfg, env, device, run_dir, tc.grad_accum
        self.use_bf16, self.autocast = bf16_autocast(tc, device)
        self.model = self.eval_model = Transformer(model_cfg).to(device)
        # DDP + expert parallelism (parallel.ep); before the optimizer, which then holds only this rank's expert shards.
        self.ddp = parallelize_from_config(self.model, cfg.parallel, device) if env.enabled else None
        self.opt = build_optimizer(self.model, cfg.optim)
        self.sched = build_scheduler(self.opt, cfg.optim, tc.steps)
        self.start_step = resume_if_asked(cfg, run_dir, self.model, self.opt, self.sched)
        wrapped = self.ddp or self.model
        self.fwd = torch.compile(wrapped) if tc.compile else wrapped

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

    def save(self, step: int) -> Path | None:
        return save(self.run_dir, step, self.model, self.opt, self.sched, self.cfg, self.env)


def engine_class(name: str):
    return TorchEngine if name == "torch" else engine_for(name)


def train(cfg: DictConfig, run_dir: Path) -> dict:
    model_cfg, tc = validate(cfg)
    Engine = engine_class(engine_name(cfg))  # who owns the step: torch, DeepSpeed or megatron-core
    env, device = Engine.start(cfg, tc)
    if not env.is_main:
        logging.getLogger("moeflow").setLevel(logging.WARNING)  # one rank narrates the run

    torch.manual_seed(tc.seed)
    splits, train_data, val_data = training_samplers(cfg.data, model_cfg.vocab_size, tc.seed)
    engine = Engine(cfg, model_cfg, tc, env, device, run_dir)  # model, optimizer, schedule; resumes if asked
    model, start_step = engine.model, engine.start_step

    writer = SummaryWriter(str(run_dir / "tensorboard")) if env.is_main else None
    stats_file = open(run_dir / "routing_stats.jsonl", "a") if env.is_main else None
    result = {"start_step": start_step}
    data_rank, data_ranks = getattr(engine, "data_parallel_rank", (env.rank, env.world_size))  # TP ranks share one batch
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * tc.grad_accum * data_ranks
    if env.is_main:
        log.info("data: %s (%d train / %d val tokens)", splits.description, len(splits.train), len(splits.val))
        log.info("%s", engine.describe())

    def evaluate_now() -> float:  # every rank evaluates: EP all-to-alls and ZeRO-3 gathers are collective
        return evaluate(engine.eval_model, val_data, tc.eval_batches, device, engine.autocast, 0)

    if start_step == 0 and tc.eval_every > 0:
        result["val_loss_start"] = evaluate_now()
        if env.is_main:
            writer.add_scalar("val/loss", result["val_loss_start"], 0)
            log.info("step 0: val loss %.4f", result["val_loss_start"])

    bar = tqdm(total=tc.steps, initial=start_step, disable=not (tc.progress and env.is_main), desc="train", mininterval=1.0, dynamic_ncols=True)
    hooks = RunHooks(env, run_dir, device)  # launcher touch points: preemption, Ray Train reports
    t_last, tokens_since = time.perf_counter(), 0
    for step in range(start_step, tc.steps):
        set_gate_step(model, step)
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            x, y = train_data.batch(step, micro, data_rank)
            loss, aux = engine.forward_backward(x.to(device), y.to(device), last=micro == tc.grad_accum - 1)
            loss_sum += loss.item()
        grad_norm = engine.optimizer_step()
        done = step + 1
        train_loss = loss_sum / tc.grad_accum
        tokens_since += tokens_per_step
        result.update(step=done, train_loss=train_loss)

        log_now = done % tc.log_every == 0 or done == tc.steps
        if env.enabled and log_now:
            sync_routing_stats(model, getattr(engine, "data_parallel_group", None))  # collective: routing statistics of the global batch
        if env.is_main and log_now:
            elapsed = time.perf_counter() - t_last
            tok_s = tokens_since / max(elapsed, 1e-9)
            t_last, tokens_since = time.perf_counter(), 0
            scalars = {"train/loss": train_loss, "train/aux_loss": aux.item(), "train/lr": engine.lr(), "train/grad_norm": grad_norm, "train/tokens_per_s": tok_s}
            for k, v in scalars.items():
                if v is not None:  # DeepSpeed has no grad norm without clipping
                    writer.add_scalar(k, v, done)
            log_routing(writer, stats_file, model, done)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}")
        if tc.eval_every > 0 and (done % tc.eval_every == 0 or done == tc.steps):
            val = evaluate_now()
            result["val_loss"] = val
            if env.is_main:
                writer.add_scalar("val/loss", val, done)
                log.info("step %d: train loss %.4f, val loss %.4f", done, train_loss, val)
        if tc.ckpt_every > 0 and (done % tc.ckpt_every == 0 or done == tc.steps):
            hooks.on_checkpoint(done, result, engine.save(done))
        if hooks.stop_requested():  # preempted (SIGUSR1/SIGTERM): checkpoint, requeue, stop
            engine.save(done)
            hooks.on_preempted(done)
            result["preempted"] = True
            break
        bar.update(1)
    bar.close()
    hooks.close()
    if writer is not None:
        writer.close()
    if stats_file is not None:
        stats_file.close()
    result.update(engine.extra_result())
    engine.close()
    shutdown_distributed()
    return result


def save(run_dir: Path, step: int, model, opt, sched, cfg: DictConfig, env: DistEnv) -> Path | None:
    model_state, opt_state = full_model_state(model), full_optimizer_state(model, opt)  # gathers expert shards (all ranks)
    if not env.is_main:
        return None
    state = {"optimizer": opt_state, "scheduler": sched.state_dict(), "rng": ckpt.rng_state(), "step": step}
    meta = {"model": model.cfg.to_dict(), "config": OmegaConf.to_container(cfg, resolve=True)}
    path = ckpt.save_checkpoint(run_dir, step, model_state, state, meta, cfg.trainer.keep_checkpoints)
    log.info("saved checkpoint %s", path)
    return path


def resume_if_asked(cfg: DictConfig, run_dir: Path, model, opt, sched) -> int:
    if cfg.resume is None:
        return 0
    where = run_dir if cfg.resume == "auto" else Path(str(cfg.resume)).expanduser()
    found = ckpt.find_checkpoint(where)
    if found is None:
        if cfg.resume == "auto":
            log.info("resume=auto: no checkpoint in %s, starting fresh", run_dir)
            return 0
        raise ckpt.CheckpointError(f"resume={cfg.resume}: no checkpoint found there; pass a run dir with checkpoints/ or a checkpoint dir")
    meta = ckpt.read_meta(found)
    state = local_model_state(model, ckpt.load_model_state(found))  # this rank's expert shards
    ckpt.check_compatible(found, meta.get("model", {}), model.cfg.to_dict(), state, model)
    model.load_state_dict(state, strict=False)
    if meta.get("weights_only"):  # e.g. written by `moeflow upcycle`: weights to start from, no optimizer state
        log.info("initialised from weights-only checkpoint %s; fresh optimizer and schedule at step 0", found)
        return 0
    trainer_state = ckpt.load_trainer_state(found)
    opt.load_state_dict(local_optimizer_state(opt, trainer_state["optimizer"]))
    sched.load_state_dict(trainer_state["scheduler"])
    ckpt.set_rng_state(trainer_state["rng"])
    log.info("resumed from %s at step %d", found, trainer_state["step"])
    return int(trainer_state["step"])


@hydra.main(version_base=None, config_path="pkg://moeflow.configs", config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = train(cfg, run_dir)
    except (ConfigError, DataError, ckpt.CheckpointError) as e:
        log.error("%s", e)
        print(f"moeflow train: error: {e}", file=sys.stderr)
        sys.exit(2)
    log.info("done: %s; run dir %s", json.dumps(result), run_dir)


def shared_run_dir(args: list[str]) -> list[str]:
    """Under torchrun every rank composes its own config; they must agree on the run dir.

    Hydra's default dir is a timestamp, which ranks may see differently. Without an
    explicit hydra.run.dir, use one derived from torchrun's rendezvous id (shared by all
    ranks; `--standalone` or `--rdzv-id` sets it), else refuse with the fix.
    """
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or any(a.startswith("hydra.run.dir=") for a in args):
        return args
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id in ("", "none"):
        print("moeflow train: error: under torchrun all ranks need the same run dir; pass hydra.run.dir=... (or launch with torchrun --standalone)", file=sys.stderr)
        sys.exit(2)
    return [*args, f"hydra.run.dir=outputs/torchrun/{run_id}"]


def main(args: list[str]) -> None:
    from .launchers import launch_elsewhere
    from .preflight import preflight

    args = shared_run_dir(args)
    preflight(args)
    if launch_elsewhere(args):  # launcher=local|slurm|ray: start the run's processes there
        return
    sys.argv = ["moeflow-train", *args]
    hydra_main()
