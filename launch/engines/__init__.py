"""Training engines: who owns the step. One module each, one interface, one loop (`launch/train.py`).

- `torch` (`torch_engine.py`): the plain PyTorch step, the reference;
- `deepspeed` (`deepspeed_engine.py`): DeepSpeed's ZeRO owns backward and step;
- `megatron` (`megatron_engine.py`): a megatron-core GPTModel whose MoE layers are moeflow's.

The loop uses an engine through one contract, `contract.Engine` (an ABC every engine
subclasses, with the defaults): the class method `start(cfg, trainer_cfg) -> (DistEnv,
device)` joins the process group; `Engine(cfg, model_cfg, trainer_cfg, env, device,
run_dir)` builds model, optimizer and schedule and resumes if asked; then
`forward_backward(x, y, last) -> (loss, aux)`, `optimizer_step() -> grad norm tensor | None`,
`lr()`, `save(step) -> checkpoint dir | None`, `poll_save()`, `finish_save()`,
`rollback(checkpoint) -> step`, `describe()`, `extra_result()`, `close()`, and the
attributes `model` (moeflow modules: gates, aux losses, routing statistics), `eval_model`,
`autocast`, `start_step`, `data_parallel_rank`, `data_parallel_group` and
`last_step_skipped`. Engines that write moeflow checkpoints (torch, megatron) subclass
`contract.MoeflowCheckpointEngine` and save and resume through `launch/resume.py`'s one
path (`checkpoint_state` / `load_checkpoint_state`).

Frameworks are imported lazily: `moeflow train` (engine=torch) never pays for DeepSpeed or
megatron-core imports, and a missing package is a one-line error naming the extra.
"""

from __future__ import annotations

import importlib
import importlib.util

from moeflow.moe.errors import ConfigError

# engine name -> (module, class, the package it needs or None, the pip extra)
ENGINES = {
    "torch": ("moeflow.launch.engines.torch_engine", "TorchEngine", None, None),
    "deepspeed": ("moeflow.launch.engines.deepspeed_engine", "DeepSpeedEngine", "deepspeed", "deepspeed"),
    "megatron": ("moeflow.launch.engines.megatron_engine", "MegatronEngine", "megatron.core", "megatron"),
}


def require(engine: str) -> None:
    """Raise a one-line error naming the extra to install when the engine's package is missing."""
    _, _, package, extra = ENGINES[engine]
    if package is None:
        return
    try:
        found = importlib.util.find_spec(package) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise ConfigError(
            f"engine={engine} needs the {package.split('.')[0]} package, which is not installed; run `pip install moeflow[{extra}]`"
        )


def engine_name(cfg) -> str:
    node = cfg.get("engine") if hasattr(cfg, "get") else None
    return "torch" if node is None else str(node.get("name", "torch"))


def engine_class(name: str):
    module, cls, _, _ = ENGINES[name]
    return getattr(importlib.import_module(module), cls)


def check_engine(cfg, model_cfg, device) -> None:
    """Engine-specific validation before any work starts; raises ConfigError."""
    name = engine_name(cfg)
    if name not in ENGINES:
        raise ConfigError(f"engine={name!r} is unknown; choose one of {', '.join(ENGINES)}")
    require(name)
    check = getattr(importlib.import_module(ENGINES[name][0]), "check_options", None)
    if check is not None:
        check(cfg, model_cfg, device)
