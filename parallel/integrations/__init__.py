"""Training engines other than the plain PyTorch loop: DeepSpeed and megatron-core.

`check_engine(cfg)` runs with the rest of config validation (before any training), so a
missing package or an option that conflicts with expert parallelism is a one-line error.
The engines import their framework lazily: `moeflow train` (engine=torch) never pays
for DeepSpeed or megatron-core imports.
"""
from __future__ import annotations

import importlib.util

ENGINES = ("torch", "deepspeed", "megatron")
_PACKAGE = {"deepspeed": ("deepspeed", "deepspeed"), "megatron": ("megatron.core", "megatron")}  # engine -> (module, extra)


class EngineUnavailable(RuntimeError):
    pass


def require(engine: str) -> None:
    """Raise a one-line error naming the extra to install when the engine's package is missing."""
    module, extra = _PACKAGE[engine]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise EngineUnavailable(f"engine={engine} needs the {module.split('.')[0]} package, which is not installed; run `pip install moeflow[{extra}]`")


def engine_name(cfg) -> str:
    node = cfg.get("engine") if hasattr(cfg, "get") else None
    return "torch" if node is None else str(node.get("name", "torch"))


def check_engine(cfg) -> None:
    """Engine-specific validation; raises moeflow.launch.config.ConfigError."""
    from moeflow.launch.config import ConfigError

    name = engine_name(cfg)
    if name not in ENGINES:
        raise ConfigError(f"engine={name!r} is unknown; choose one of {', '.join(ENGINES)}")
    if name == "torch":
        return
    try:
        require(name)
    except EngineUnavailable as e:
        raise ConfigError(str(e)) from None
    if name == "deepspeed":
        from .deepspeed_engine import check_options
    else:
        from .megatron_core import check_options
    check_options(cfg)


def engine_for(name: str):
    """The engine class of a non-torch engine, which `moeflow.launch.train.train`'s loop drives."""
    module, cls = {"deepspeed": ("moeflow.launch.train_deepspeed", "DeepSpeedEngine"), "megatron": ("moeflow.launch.train_megatron", "MegatronEngine")}[name]
    return getattr(importlib.import_module(module), cls)


def torch_engine_optimizer_state(model_cfg, optim_cfg, total_steps: int, step: int) -> tuple[dict, dict]:
    """(optimizer, scheduler) state dicts that engine=torch resumes from at `step`: AdamW with
    zero moments (other engines keep theirs in their own layout) and the schedule replayed to `step`."""
    import warnings

    import torch

    from moeflow.launch.train import build_optimizer, build_scheduler
    from moeflow.moe.model import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    opt = build_optimizer(model, optim_cfg)
    sched = build_scheduler(opt, optim_cfg, total_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping the schedule without optimizer steps, on purpose
        for _ in range(step):
            sched.step()
    return opt.state_dict(), sched.state_dict()
