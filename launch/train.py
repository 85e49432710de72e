"""The training loop, one for every engine: `train(cfg, run_dir)` reads top to bottom.

validate config -> join the process group -> data -> engine (model, optimizer, schedule,
resume) -> loop of {micro-batches, optimizer step, log, eval, checkpoint, preemption check}.
The engine object owns only the step (`moeflow.launch.engines`: torch, DeepSpeed,
megatron-core; the loop uses its contract, `engines/contract.py`, alone), so launcher hooks
(Slurm preemption, Ray Train reports), logging and
evaluation behave the same under every engine. Everything the run writes (train.log,
TensorBoard events, routing_stats.jsonl, checkpoints) lands in the run dir.
`moeflow train` (train_command.py) is the command line around it.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from moeflow.moe.errors import ConfigError
from moeflow.parallel.distributed import shutdown_distributed
from moeflow.parallel.routing_stats import routing_stats_to_host, sync_routing_stats

from . import checkpoint as ckpt
from .config import global_batch_accum, validate
from .data import BatchSampler, training_samplers
from .divergence import DivergenceGuard, finite
from .engines import engine_class, engine_name
from .losses import lm_loss
from .profiling import StepProbe
from .routing_health import CollapseWatch
from .run_hooks import RunHooks
from .runtime import batch_to_device
from .tokenizer_files import TOKENIZER_DIR, carry_into_run
from .trackers import Trackers, chosen
from .watchdog import Heartbeat, is_timeout

log = logging.getLogger("moeflow.train")


@torch.no_grad()
def evaluate(
    model, sampler: BatchSampler, n_batches: int, device, autocast, rank: int = 0, ranks: int = 1, group=None
) -> float:
    """The validation loss over `n_batches` fixed global batches (data.batch_size x data-parallel ranks
    sequences each, every rank its slice, as in training): the same number on every mesh."""
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(n_batches):
        x, y = sampler.batch(1_000_000, i, rank, ranks)  # fixed held-out batches, a key space disjoint from training's
        batch_loss = getattr(model, "batch_loss", None)  # a pipelined model's: through its schedule
        with autocast():
            x, y = batch_to_device(device, x, y)
            total += (batch_loss(x, y) if batch_loss is not None else lm_loss(model(x), y)).float()
    model.train()
    return mean_over(total / n_batches, group).item()  # equal slices: the mean over ranks is the global batch's mean


def log_routing(writer: Trackers | None, stats_file, model, step: int, warned: set | None = None) -> None:
    """Routing statistics of every MoE layer to TensorBoard and routing_stats.jsonl; a dispatcher's
    warning (capacity drops) is shown once per run (`warned` holds the kinds already shown)."""
    rows = []
    for i, layer in enumerate(model.moe_layers()):
        s = layer.last_stats
        if not s:
            continue
        row = {"step": step, "layer": i}
        for k, v in s.items():
            row[k] = v.tolist() if v.dim() else v.item()
            if writer is not None and v.dim() == 0:  # every scalar statistic: balance, entropy, aux losses, drops
                writer.add_scalar(f"moe/layer{i}/{k}", v.item(), step)
        drop_warning = getattr(layer.dispatcher, "drop_warning", None)
        if (
            drop_warning is not None
            and warned is not None
            and "drops" not in warned
            and "dispatch_dropped_fraction" in row
        ):
            message = drop_warning(row["dispatch_dropped_fraction"], i, step)
            if message:
                warned.add("drops")
                warnings.warn(message, stacklevel=2)
        if writer is not None:
            writer.add_histogram(f"moe/layer{i}/tokens_per_expert", s["tokens_per_expert"], step)
        rows.append(row)
    if stats_file is not None:
        stats_file.write("".join(json.dumps(r) + "\n" for r in rows))
        stats_file.flush()


def loss_readings(loss: float, byte_level: bool) -> tuple[str, dict[str, float]]:
    """The loss in the units people read: bits per byte for byte-level text, perplexity for tokens.
    (A log phrase, and the TensorBoard scalars beside val/loss, which is nats per byte or token.)"""
    if byte_level:
        bits = loss / math.log(2)
        return f"nats/byte ({bits:.3f} bits/byte)", {"val/bits_per_byte": bits}
    ppl = math.exp(min(loss, 700.0))
    return f"nats/token (perplexity {ppl:.2f})", {"val/perplexity": ppl}


def mean_over(t: torch.Tensor, group=None) -> torch.Tensor:
    """The mean of `t` over the data-parallel ranks (`group`, None: the world; identity in one process)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return t
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t / dist.get_world_size(group)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_flops_per_token(model_cfg, seq_len: int) -> float:
    """6 per active matmul parameter plus attention (the count `moeflow bench train` uses for MFU)."""
    from moeflow.moe.param_count import param_counts

    _, active = param_counts(model_cfg)
    matmul = (
        active
        - model_cfg.vocab_size * model_cfg.d_model
        + (model_cfg.vocab_size * model_cfg.d_model if model_cfg.tie_embeddings else 0)
    )
    return 6.0 * matmul + 12 * model_cfg.n_layers * model_cfg.n_heads * model_cfg.head_size * seq_len


DATASHEET_BF16_TFLOPS = {
    "H100": 989.4,
    "H200": 989.4,
    "H800": 989.4,
    "GH200": 989.4,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "B200": 2250.0,
}


def datasheet_peak_flops(device) -> float | None:
    """The dense bf16 peak of this GPU from its datasheet (MFU's usual denominator), None if unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in DATASHEET_BF16_TFLOPS.items() if key in name), None)


def step_line(
    step: int,
    steps: int,
    loss: float,
    lr: float,
    norm: float | None,
    tok_s: float,
    flops_token: float,
    peak: float | None,
    device,
    model,
) -> str:
    """One line per log step (run log, and stdout where there is no progress bar): what torchtitan and Megatron print."""
    parts = [f"step {step}/{steps}", f"loss {loss:.4f}", f"lr {lr:.3g}"]
    if norm is not None:
        parts.append(f"grad norm {norm:.3f}")
    parts.append(f"{tok_s:,.0f} tok/s")
    if peak:
        parts.append(f"MFU {100 * tok_s * flops_token / peak:.1f}%")
    if device.type == "cuda":
        parts.append(f"peak mem {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    balance = [layer.last_stats.get("load_max_over_mean") for layer in model.moe_layers() if layer.last_stats]
    if balance:
        values = [float(b) for b in balance if b is not None]
        if values:
            parts.append(f"load max/mean {min(values):.2f}-{max(values):.2f} over {len(values)} layers")
    return ", ".join(parts)


def set_gate_step(model, step: int) -> None:
    for layer in model.moe_layers():
        layer.gate.set_step(step)


def refuse_fresh_run_over_checkpoints(cfg: DictConfig, run_dir: Path) -> None:
    """A fresh run (resume=null, or starting from a checkpoint outside this run dir: an upcycled model)
    in a run dir that holds another run's checkpoints would overwrite their steps while the old later
    ones stay "latest": refuse, naming the two ways on."""
    if cfg.resume == "auto":
        return
    if cfg.resume is not None:
        start = Path(str(cfg.resume)).expanduser().resolve()
        if start == Path(run_dir).resolve() or Path(run_dir).resolve() in start.parents:
            return  # this run's own checkpoint
    root = Path(run_dir) / ckpt.CKPT_DIR
    found = (
        sorted(
            p
            for p in root.iterdir()
            if p.is_dir() and (ckpt.STEP_NAME.fullmatch(p.name) or p.name.startswith(ckpt.TMP_PREFIX))
        )
        if root.is_dir()
        else []
    )
    if found:
        raise ConfigError(
            f"run dir {run_dir} already holds checkpoints of an earlier run ({found[-1].name}); continue it with resume=auto, "
            f"or start a fresh run in a new dir (hydra.run.dir=...)"
        )


def train(cfg: DictConfig, run_dir: Path) -> dict:
    import os

    from .run_lock import RunLock

    model_cfg, trainer_cfg = validate(cfg)
    refuse_fresh_run_over_checkpoints(cfg, run_dir)
    lock = RunLock(run_dir).acquire() if int(os.environ.get("RANK", "0")) == 0 else None  # one run per run dir
    progress = {"where": "while building the model"}  # _train moves it on: "at step 3", "in the evaluation after ..."
    try:
        return _train(cfg, run_dir, model_cfg, trainer_cfg, progress)
    except Exception as e:
        from .out_of_memory import find_oom, out_of_memory

        oom = find_oom(e)  # also wrapped: a pipeline stage's RuntimeError, torch.compile's backend error
        if oom is None:
            raise
        raise out_of_memory(cfg, model_cfg, trainer_cfg, progress["where"], oom=oom) from e
    finally:
        if lock is not None:
            lock.release()


def derive_grad_accum(cfg: DictConfig, trainer_cfg, world: int) -> None:
    """data.global_batch_size (Megatron's --global-batch-size): trainer.grad_accum follows from it, the
    per-rank micro-batch and the data-parallel ranks of this launch, so the same global batch holds on
    any number of ranks (`config.global_batch_accum` refuses what cannot)."""
    from omegaconf import open_dict

    derived = global_batch_accum(cfg, trainer_cfg.grad_accum, world)
    if derived is None:
        return
    accum, dp = derived
    trainer_cfg.grad_accum = accum
    with open_dict(cfg):
        cfg.trainer.grad_accum = accum
    log.info(
        "global batch %d sequences = data.batch_size %d x %d data-parallel ranks x %d accumulation steps",
        cfg.data.global_batch_size,
        cfg.data.batch_size,
        dp,
        accum,
    )


def _train(cfg: DictConfig, run_dir: Path, model_cfg, trainer_cfg, progress: dict) -> dict:
    Engine = engine_class(engine_name(cfg))  # who owns the step: torch, DeepSpeed or megatron-core
    env, device = Engine.start(cfg, trainer_cfg)
    if not env.is_main:
        logging.getLogger("moeflow").setLevel(logging.WARNING)  # one rank narrates the run
    derive_grad_accum(cfg, trainer_cfg, env.world_size)

    torch.manual_seed(trainer_cfg.seed)
    splits, train_data, val_data = training_samplers(cfg.data, model_cfg.vocab_size, trainer_cfg.seed)
    if env.is_main:  # the run carries its tokenizer (generate, eval and exports read this copy)
        start = ckpt.find_checkpoint(Path(str(cfg.resume)).expanduser()) if cfg.resume not in (None, "auto") else None
        src = carry_into_run(run_dir, start, cfg.data)
        if src is not None:
            log.info("tokenizer: copied %s into %s", src, run_dir / TOKENIZER_DIR)
    # the trackers start before the model is built: a tracker that cannot start fails the run before any work
    writer = (
        Trackers(
            chosen(cfg.logger),
            run_dir,
            OmegaConf.to_container(cfg, resolve=True),
            OmegaConf.to_container(cfg.tracking, resolve=True) if cfg.get("tracking") else None,
        )
        if env.is_main
        else None
    )
    engine = Engine(cfg, model_cfg, trainer_cfg, env, device, run_dir)  # model, optimizer, schedule; resumes if asked
    if (
        device.type == "cuda"
    ):  # the peak this run reports is its own, not an earlier one's in this process (CUDA is up by now)
        torch.cuda.reset_peak_memory_stats(device)
    model, start_step = engine.model, engine.start_step

    stats_file = open(run_dir / "routing_stats.jsonl", "a") if env.is_main else None
    warned: set = set()  # warnings shown once per run
    result = {"start_step": start_step}
    data_rank, data_ranks = engine.data_parallel_rank  # TP ranks share one batch
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * trainer_cfg.grad_accum * data_ranks
    if env.is_main:
        log.info("data: %s (%d train / %d val tokens)", splits.description, *splits.token_counts)
        log.info("%s", engine.describe())
        if cfg.optim.warmup_steps > trainer_cfg.steps:  # warmup reaches optim.lr at step warmup_steps
            log.warning(
                "optim.warmup_steps=%d >= trainer.steps=%d: the whole run is warmup and the learning rate never reaches optim.lr=%g",
                cfg.optim.warmup_steps,
                trainer_cfg.steps,
                cfg.optim.lr,
            )

    byte_level = cfg.data.source in ("stdlib", "text")
    if env.is_main:  # what the loss scalars mean, once, beside them in TensorBoard
        writer.add_text(
            "units",
            "train/loss and val/loss: mean cross-entropy in nats per "
            + ("byte; val/bits_per_byte = val/loss / ln 2" if byte_level else "token; val/perplexity = exp(val/loss)"),
            0,
        )

    def report_val(loss: float, step: int) -> None:
        writer.add_scalar("val/loss", loss, step)
        for tag, value in loss_readings(loss, byte_level)[1].items():
            writer.add_scalar(tag, value, step)

    def evaluate_now() -> float:  # every rank evaluates: EP all-to-alls and ZeRO-3 gathers are collective
        return evaluate(
            engine.eval_model,
            val_data,
            trainer_cfg.eval_batches,
            device,
            engine.autocast,
            data_rank,
            data_ranks,
            engine.data_parallel_group,
        )

    if start_step == 0 and trainer_cfg.eval_every > 0:
        progress["where"] = "in the evaluation before step 1"
        result["val_loss_start"] = evaluate_now()
        if env.is_main:
            report_val(result["val_loss_start"], 0)
            log.info(
                "step 0: val loss %.4f %s",
                result["val_loss_start"],
                loss_readings(result["val_loss_start"], byte_level)[0],
            )

    if start_step >= trainer_cfg.steps:
        if start_step > trainer_cfg.steps:
            raise ConfigError(
                f"the checkpoint resumed is at step {start_step} but trainer.steps={trainer_cfg.steps}: nothing to train; raise trainer.steps above {start_step}"
            )
        log.info("the run is already complete (step %d of %d)", start_step, trainer_cfg.steps)
    # a bar only on a terminal: a Slurm .out or a redirected log gets the one line per log step below
    bar = tqdm(
        total=trainer_cfg.steps,
        initial=start_step,
        disable=not (trainer_cfg.progress and env.is_main and sys.stderr.isatty()),
        desc="train",
        mininterval=1.0,
        dynamic_ncols=True,
    )
    flops_token, peak_flops = training_flops_per_token(model_cfg, cfg.data.seq_len), datasheet_peak_flops(device)
    hooks = RunHooks(env, run_dir, device)  # launcher touch points: preemption, Ray Train reports
    guard = DivergenceGuard(trainer_cfg.on_nonfinite)
    heartbeat = Heartbeat(env.rank, env.world_size)  # names a stalled rank if a collective times out
    collapse = CollapseWatch()  # dead experts, routers that cannot tell experts apart
    probe = StepProbe(
        trainer_cfg, run_dir, device, start_step, env.rank, env.world_size, env.is_main
    )  # trainer.profile, bench phase times

    t_last, tokens_since, attempt, train_loss = time.perf_counter(), 0, 0, None
    t_start = t_last
    try:
        step = start_step
        while step < trainer_cfg.steps:
            progress["where"] = f"at step {step + 1}"
            probe.begin(step)
            set_gate_step(model, step)
            loss_sum = torch.zeros((), device=device)  # on the device: no host read per micro-batch
            for micro in range(trainer_cfg.grad_accum):
                x, y = train_data.batch(step, micro, data_rank, data_ranks, attempt)
                x, y = batch_to_device(device, x, y)  # no host sync: the host runs ahead of the GPU
                loss, aux = engine.forward_backward(x, y, last=micro == trainer_cfg.grad_accum - 1)
                heartbeat.step = step
                loss_sum += loss.detach().float()
            grad_norm = engine.optimizer_step()
            probe.end(step + 1, result)
            engine.poll_save()  # an async save whose write finished is committed now, not at the next save
            done = step + 1
            tokens_since += tokens_per_step
            if done == start_step + 1:  # one device sync, once: how long the first step (compiles, autotuning) took
                synchronize(device)
                result["first_step_s"] = time.perf_counter() - t_start

            log_now = done % trainer_cfg.log_every == 0 or done == trainer_cfg.steps
            eval_now = trainer_cfg.eval_every > 0 and (done % trainer_cfg.eval_every == 0 or done == trainer_cfg.steps)
            save_now = trainer_cfg.ckpt_every > 0 and (done % trainer_cfg.ckpt_every == 0 or done == trainer_cfg.steps)
            if log_now or eval_now or save_now:  # read the loss (the mean over data-parallel ranks) and check it
                train_loss = mean_over(loss_sum / trainer_cfg.grad_accum, engine.data_parallel_group).item()
                norm = None if grad_norm is None else float(grad_norm)
                result.update(step=done, train_loss=train_loss)
                if not finite(train_loss, norm) and not engine.last_step_skipped:
                    last_good = ckpt.find_checkpoint(run_dir)
                    guard.on_nonfinite(done, train_loss, norm, last_good)  # raises unless it rolls back
                    step, attempt = engine.rollback(last_good), attempt + 1
                    bar.reset(total=trainer_cfg.steps)
                    bar.update(step)
                    continue
            stages = None
            if env.enabled and log_now:
                sync_routing_stats(
                    model, engine.data_parallel_group
                )  # collective: routing statistics of the global batch
                stages = engine.stage_report()  # collective under pipeline parallelism
            if env.is_main and log_now:
                routing_stats_to_host(model)  # one device read for the routing statistics the log reads below
                elapsed = time.perf_counter() - t_last
                tok_s = tokens_since / max(elapsed, 1e-9)
                t_last, tokens_since = time.perf_counter(), 0
                result["tokens_per_s"] = tok_s  # of the last logging interval (`moeflow bench train` reads it)
                scalars = {
                    "train/loss": train_loss,
                    "train/aux_loss": aux.item(),
                    "train/lr": engine.lr(),
                    "train/grad_norm": norm,
                    "train/tokens_per_s": tok_s,
                }
                for k, v in scalars.items():
                    if v is not None:  # DeepSpeed has no grad norm without clipping
                        writer.add_scalar(k, v, done)
                log_routing(writer, stats_file, model, done, warned)
                collapse.check(model, done)
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}")
                log.info(
                    "%s",
                    step_line(
                        done,
                        trainer_cfg.steps,
                        train_loss,
                        engine.lr(),
                        norm,
                        tok_s,
                        flops_token,
                        peak_flops,
                        device,
                        model,
                    ),
                )
            if env.is_main and stages:
                log.info("step %d: %s", done, stages)
            if eval_now:
                progress["where"] = f"in the evaluation after step {done}"
                val = evaluate_now()
                result["val_loss"] = val
                if env.is_main:
                    report_val(val, done)
                    log.info(
                        "step %d: train loss %.4f, val loss %.4f %s",
                        done,
                        train_loss,
                        val,
                        loss_readings(val, byte_level)[0],
                    )
            if save_now:
                progress["where"] = f"while saving the checkpoint of step {done}"
                hooks.on_checkpoint(done, result, engine.save(done))
            if (
                hooks.stop_requested()
            ):  # preempted (SIGUSR1/SIGTERM): checkpoint, requeue, stop; or Ctrl-C/SIGTERM outside Slurm
                engine.save(done)
                hooks.on_preempted(done)
                result["preempted"] = True
                result["stopped_by"] = hooks.signal_name
                result["step"] = done
                break
            bar.update(1)
            step = done
    except Exception as e:
        try:
            engine.finish_save()  # a save in flight is kept, not abandoned
        except Exception as err:  # noqa: BLE001  (the first error is the one to report)
            log.warning("the checkpoint being saved when the run failed was not committed: %s", err)
        if env.enabled and is_timeout(e):
            raise heartbeat.explain(e, trainer_cfg.collective_timeout) from None
        raise  # an out-of-memory error is said by train(), at progress["where"]
    finally:
        heartbeat.close()
        probe.close()
    progress["where"] = "after the last step (closing the run, committing a save)"
    bar.close()
    hooks.close()
    if writer is not None:
        writer.close()
    if stats_file is not None:
        stats_file.close()
    if device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    result.update(engine.extra_result())
    engine.close()  # an async save in flight is committed here
    shutdown_distributed()
    if result.get("preempted") and not hooks.armed:
        from moeflow.moe.errors import Interrupted

        raise Interrupted(
            f"stopped by {result['stopped_by']} after step {result['step']}, checkpoint saved in {run_dir / ckpt.CKPT_DIR}; "
            f"continue with the same command plus resume=auto hydra.run.dir={run_dir}"
        )
    return result


def hydra_main() -> None:
    """The Hydra app `moeflow train` runs in-process (its job name, `train`, names train.log)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from moeflow.moe.errors import MoeflowError

    from .cli import report_error
    from .recorded_model import adopt_recorded_model

    @hydra.main(version_base=None, config_path="pkg://moeflow.configs", config_name="train")
    def run(cfg: DictConfig) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            adopted = adopt_recorded_model(cfg, sys.argv[1:], run_dir)
            if adopted:
                log.info("%s", adopted)
            result = train(cfg, run_dir)
        except MoeflowError as e:  # inside Hydra's job: into train.log too, then the one-line error
            log.error("%s", e)
            report_error("train", e)
        log.info("done: %s; run dir %s", json.dumps(result), run_dir)

    run()
