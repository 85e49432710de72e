"""engine=deepspeed: the DeepSpeed JSON config, generated from the Hydra config and merged with a user's.

The DeepSpeed config is generated from the Hydra config (micro-batch, grad accumulation,
clipping, ZeRO stage, CPU optimizer offload, bf16) and a user JSON (`engine.config_file`)
is merged over it, so anything DeepSpeed offers stays reachable; the keys moeflow derives
must agree (`check_user_config`), and option combinations DeepSpeed cannot run are refused
before any work (`check_options`).
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from moeflow.moe.errors import ConfigError


def _engine_cfg(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg.engine, resolve=True)


# DeepSpeed keys moeflow derives from its own config: a user JSON may repeat them only with the
# same value; otherwise the run would silently not be the one the moeflow config describes.
DERIVED_KEYS = {
    ("train_micro_batch_size_per_gpu",): "data.batch_size",
    ("gradient_accumulation_steps",): "trainer.grad_accum",
    ("gradient_clipping",): "optim.grad_clip",
    ("zero_optimization", "stage"): "engine.zero_stage",
    ("bf16", "enabled"): "trainer.precision",
    ("fp16", "enabled"): "trainer.precision",
    ("optimizer",): "optim.* (moeflow's AdamW is the optimizer)",
    ("scheduler",): "optim.schedule and optim.warmup_steps (moeflow's schedule)",
    ("train_batch_size",): "data.batch_size x trainer.grad_accum x the number of ranks",
}


def _lookup(d: dict, path: tuple):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return _MISSING
        d = d[k]
    return d


_MISSING = object()


def _bf16(cfg: DictConfig, device) -> bool:
    return cfg.trainer.precision == "bf16" or (
        cfg.trainer.precision == "auto" and device is not None and device.type == "cuda"
    )


def check_user_config(cfg: DictConfig, device=None) -> None:
    """Every key of engine.config_file that moeflow derives must agree with the derived value."""
    path = _engine_cfg(cfg).get("config_file")
    if not path:
        return
    user = read_user_config(path)
    generated = deepspeed_config(cfg, use_bf16=_bf16(cfg, device), include_user=False)
    for key, moeflow_key in DERIVED_KEYS.items():
        theirs, ours = _lookup(user, key), _lookup(generated, key)
        if theirs is _MISSING or theirs == ours:
            continue
        shown = ".".join(key)
        raise ConfigError(
            f"engine.config_file={path} sets {shown}={json.dumps(theirs)}, which moeflow derives from {moeflow_key}"
            f"{'' if ours is _MISSING else f' (here {json.dumps(ours)})'}; set it there and remove {shown} from the file"
        )


def check_options(cfg: DictConfig, model_cfg=None, device=None) -> None:
    """Reject option combinations DeepSpeed cannot run, saying which and why (on the merged config)."""
    e = _engine_cfg(cfg)
    if int(cfg.parallel.tp) > 1:
        raise ConfigError(
            f"parallel.tp={cfg.parallel.tp}: engine=deepspeed has no tensor parallelism here; use engine=megatron for it, or parallel.tp=1"
        )
    path = e.get("config_file")
    if path and not Path(str(path)).expanduser().is_file():
        raise ConfigError(
            f"engine.config_file={path} does not exist; pass the path of a DeepSpeed JSON config (or null)"
        )
    check_user_config(cfg, device)
    merged = deepspeed_config(cfg, use_bf16=_bf16(cfg, device))
    zero = merged.get("zero_optimization", {})
    stage, offload = (
        zero.get("stage"),
        "offload_optimizer" in zero and zero["offload_optimizer"].get("device", "none") != "none",
    )
    ep = int(cfg.parallel.ep)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine.zero_stage={stage!r} is not a ZeRO stage; use 0, 1, 2 or 3")
    if offload and stage == 0:
        raise ConfigError(
            "engine.offload_optimizer=true needs ZeRO (DeepSpeed offloads the partitioned optimizer state); set engine.zero_stage=1, 2 or 3"
        )
    if ep > 1 and stage == 3:
        raise ConfigError(
            f"engine.zero_stage=3 conflicts with parallel.ep={ep}: DeepSpeed's ZeRO-3 takes expert parallelism only for its own AutoEP layers ('Native DeepSpeed MoE is not supported with ZeRO Stage 3'), not for moeflow's MoE layers; use engine.zero_stage=1 or 2 with expert parallelism"
        )
    if ep > 1 and stage == 0:
        raise ConfigError(
            f"engine.zero_stage=0 conflicts with parallel.ep={ep}: without ZeRO, DeepSpeed clips by the mean of per-rank gradient norms, which with experts sharded over EP is not the global norm; use engine.zero_stage=1 or 2 with expert parallelism"
        )


def read_user_config(path) -> dict:
    try:
        return json.loads(Path(str(path)).expanduser().read_text())
    except ValueError as err:
        raise ConfigError(f"engine.config_file={path} is not valid JSON ({err}); fix the file") from None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(cfg: DictConfig, use_bf16: bool, include_user: bool = True) -> dict:
    """The DeepSpeed JSON for this Hydra config (the user JSON merged over it, its derived keys checked to agree)."""
    e = _engine_cfg(cfg)
    zero = {"stage": int(e["zero_stage"]), "contiguous_gradients": True, "reduce_scatter": True, "overlap_comm": False}
    if e.get("offload_optimizer"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    generated = {
        "train_micro_batch_size_per_gpu": int(cfg.data.batch_size),
        "gradient_accumulation_steps": int(cfg.trainer.grad_accum),
        "gradient_clipping": float(cfg.optim.grad_clip),  # 0 disables, like the torch engine
        "zero_optimization": zero,
        "bf16": {"enabled": bool(use_bf16)},
        # moeflow's AdamW (torch) is the optimizer: allow it under ZeRO and offload
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if include_user and e.get("config_file"):
        generated = _merge(generated, read_user_config(e["config_file"]))
    return generated
