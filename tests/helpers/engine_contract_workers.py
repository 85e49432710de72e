"""Workers of tests/integration/test_engine_contract.py: one engine built from a train config and run
two optimizer steps (two micro-batches each) through the engine contract (`launch/engines/contract.py`)
alone, on the gloo ranks `helpers.ep_workers.spawn` starts. Each contract member is checked for what
the loop relies on (its type, and what it must and must not do); the worker returns the members it
checked, so the test can require a check for every member of the contract.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

MODEL = [
    "model.n_layers=2",
    "model.d_model=32",
    "model.n_heads=4",
    "model.d_ff=24",
    "model.num_experts=4",
    "model.max_seq_len=16",
    "data.seq_len=16",
    "data.batch_size=2",
    "trainer.grad_accum=2",
    "trainer.steps=2",
    "trainer.precision=fp32",
    "optim.warmup_steps=1",
]
ENGINES = {
    "torch": ["engine=torch"],
    "deepspeed": ["engine=deepspeed", "engine.zero_stage=1"],
    "megatron": ["engine=megatron", "experts.impl=torch"],
}


def _config(name: str, device: str, *overrides: str):
    from hydra import compose, initialize_config_module

    from moeflow.launch.config import model_config, trainer_config

    with initialize_config_module(config_module="moeflow.configs", version_base=None):
        cfg = compose(config_name="train", overrides=[*MODEL, *ENGINES[name], f"trainer.device={device}", *overrides])
    return cfg, model_config(cfg), trainer_config(cfg)


def _snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _changed(model: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return any(not torch.equal(p.detach(), q) for p, q in zip(model.parameters(), before))


def _scalar(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 0 and t.is_floating_point()


def two_steps(
    rank: int, world: int, name: str, run_dir: str, forward: bool, device: str = "cpu", *overrides: str
) -> dict:
    """Build engine `name` and run it two steps as the loop does. `forward=False` (megatron on CPU,
    whose GPTModel forward needs CUDA): each micro-batch's backward is stood in for by gradients
    set on the parameters (in megatron DDP's grad buffers, where its backward puts them), and
    `forward_backward` is not called."""
    from moeflow.launch import checkpoint as ckpt
    from moeflow.launch.engines import engine_class
    from moeflow.launch.engines.contract import Engine, MoeflowCheckpointEngine
    from moeflow.moe.errors import ConfigError
    from moeflow.parallel.distributed import DistEnv

    checked: set[str] = set()

    def check(member: str, ok: bool, what: str) -> None:
        assert ok, f"engine={name}: {member}: {what}"
        checked.add(member)

    cfg, mc, tc = _config(name, device, *overrides)
    Cls = engine_class(name)
    check(
        "name",
        issubclass(Cls, Engine) and Cls.name == name,
        f"the class {Cls} must subclass contract.Engine and be named {name!r}",
    )
    if name == "megatron":
        from helpers.megatron_workers import _grad_buffers_on_cpu

        _grad_buffers_on_cpu()  # megatron DDP's grad buffers
    env, dev = Cls.start(cfg, tc)
    check(
        "start",
        isinstance(env, DistEnv) and isinstance(dev, torch.device) and env.world_size == world,
        f"start() -> (DistEnv, torch.device) of this world, got {env!r}, {dev!r}",
    )
    torch.manual_seed(tc.seed)
    engine = Cls(cfg, mc, tc, env, dev, Path(run_dir))

    model = engine.model
    check(
        "model",
        isinstance(model, torch.nn.Module) and len(model.moe_layers()) > 0 and _scalar(model.aux_loss()),
        "a torch module with moe_layers() and a scalar aux_loss()",
    )
    check("eval_model", callable(engine.eval_model), "callable (tokens -> logits)")
    ctx = engine.autocast()
    with ctx:
        pass
    check("autocast", hasattr(ctx, "__enter__"), "a factory of context managers")
    check(
        "start_step",
        type(engine.start_step) is int and engine.start_step == 0,
        f"an int, 0 for a fresh run; got {engine.start_step!r}",
    )
    r, n = engine.data_parallel_rank
    check(
        "data_parallel_rank",
        type(r) is int and type(n) is int and 0 <= r < n and world % n == 0,
        f"(rank, size) with size dividing the world, got {engine.data_parallel_rank!r}",
    )
    group = engine.data_parallel_group
    check(
        "data_parallel_group",
        group is None or isinstance(group, dist.ProcessGroup),
        f"None or a process group, got {group!r}",
    )
    check("last_step_skipped", engine.last_step_skipped is False, "False before any step")
    text = engine.describe()
    check("describe", isinstance(text, str) and text.strip() != "", "a non-empty string")

    gen = torch.Generator().manual_seed(1000 + rank)
    norms, lrs, losses = [], [], []
    for step in range(tc.steps):
        before = _snapshot(model)
        for micro in range(tc.grad_accum):
            last = micro == tc.grad_accum - 1
            if forward:
                x = torch.randint(0, mc.vocab_size, (cfg.data.batch_size, cfg.data.seq_len), generator=gen).to(dev)
                y = torch.randint(0, mc.vocab_size, (cfg.data.batch_size, cfg.data.seq_len), generator=gen).to(dev)
                loss, aux = engine.forward_backward(x, y, last=last)
                check(
                    "forward_backward",
                    _scalar(loss) and _scalar(aux) and bool(torch.isfinite(loss)),
                    f"(loss, aux) 0-dim tensors, got {loss!r}, {aux!r}",
                )
                check(
                    "forward_backward",
                    not _changed(model, before),
                    "must not step the optimizer (that is optimizer_step's)",
                )
                losses.append(float(loss))
            else:
                for p in model.parameters():
                    g = torch.randn(p.shape, generator=gen).to(p.device, p.dtype) * 1e-2
                    if hasattr(p, "main_grad"):  # where megatron DDP's backward hook accumulates
                        p.main_grad.add_(g)
                    else:
                        p.grad = g if p.grad is None else p.grad + g
        norm = engine.optimizer_step()
        check(
            "optimizer_step",
            norm is None or (_scalar(norm) and not norm.requires_grad),
            f"the gradient norm as a 0-dim tensor (read by the loop when it logs, not here) or None, got {type(norm).__name__} {norm!r}",
        )
        check("optimizer_step", _changed(model, before), "must update the weights")
        norms.append(None if norm is None else float(norm))
        check(
            "last_step_skipped",
            type(engine.last_step_skipped) is bool and not engine.last_step_skipped,
            "a bool, False after a finite step",
        )
        lr = engine.lr()
        check("lr", isinstance(lr, float) and lr > 0, f"the learning rate as a float, got {lr!r}")
        lrs.append(lr)
        polled = engine.poll_save()
        check("poll_save", polled is None or isinstance(polled, Path), f"None or a checkpoint dir, got {polled!r}")

    saved = engine.save(tc.steps)
    check(
        "save",
        saved is None or (isinstance(saved, Path) and saved.is_dir()),
        f"None or the checkpoint dir, got {saved!r}",
    )
    if rank == 0:
        check(
            "save",
            isinstance(saved, Path) and (saved / ckpt.META).is_file(),
            f"rank 0 reports the committed checkpoint, got {saved!r}",
        )
    finished = engine.finish_save()
    check("finish_save", finished is None or isinstance(finished, Path), f"None or a checkpoint dir, got {finished!r}")
    dist.barrier()
    if isinstance(engine, MoeflowCheckpointEngine):
        step = engine.rollback(ckpt.find_checkpoint(Path(run_dir)))
        check("rollback", step == tc.steps, f"reloads the checkpoint and returns its step ({tc.steps}), got {step!r}")
    else:
        try:
            engine.rollback(Path(run_dir))
            raised = False
        except ConfigError:
            raised = True
        check("rollback", raised, "an engine without moeflow checkpoints refuses in one line (ConfigError)")
    extra = engine.extra_result()
    check("extra_result", isinstance(extra, dict), f"a dict, got {extra!r}")
    report = engine.stage_report()  # (collective where it reports: every rank calls it)
    check(
        "stage_report",
        report is None or (isinstance(report, str) and "\n" not in report),
        f"None or a line, got {report!r}",
    )
    engine.close()
    check("close", True, "")
    return {
        "checked": sorted(checked),
        "norms": norms,
        "lrs": lrs,
        "losses": losses,
        "saved": None if saved is None else str(saved),
    }
