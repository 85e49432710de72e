"""The types and ranges of every config key, checked before anything runs (one line per problem).

Each group has a dataclass here whose fields are the group's keys, typed; `check(cfg)` walks the
composed config and refuses a value of the wrong type or out of range, naming the key, what was
given and what it takes. (Hydra has already refused unknown keys; a gate's own options are
checked by its constructor, the model's shape by `ModelConfig`.) Imports nothing heavy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moeflow.moe.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    kind: type | tuple  # int, float, bool, str, list; float accepts ints
    low: float | None = None  # inclusive
    high: float | None = None  # inclusive
    choices: tuple | None = None
    nullable: bool = False
    low_exclusive: bool = False
    high_exclusive: bool = False
    length: int | None = None  # lists: how many items
    why: str = ""


def positive_int(why: str = "") -> Rule:
    return Rule(int, low=1, why=why)


SCHEMA: dict[str, dict[str, Rule]] = {
    "trainer": {
        "steps": positive_int(),
        "grad_accum": positive_int(),
        "eval_every": Rule(int, low=0, why="0 disables evaluation"),
        "eval_batches": positive_int(),
        "log_every": positive_int(),
        "ckpt_every": Rule(int, low=0, why="0 disables checkpoints; a negative value would silently never checkpoint"),
        "keep_checkpoints": Rule(int, low=0, why="0 keeps every checkpoint"),
        "device": Rule(str),
        "precision": Rule(str, choices=("auto", "bf16", "fp32")),
        "seed": Rule(int, low=0, high=2**32 - 1, why="numpy's generators take 32-bit seeds"),
        "progress": Rule(bool),
        "compile": Rule(bool),
        "compile_scope": Rule(str, choices=("model", "blocks")),
        "profile": Rule(bool),
        "activation_checkpointing": Rule(str, choices=("none", "full", "selective")),
        "activation_checkpointing_every": positive_int(),
        "async_checkpoint": Rule(bool),
        "verify_checkpoint": Rule(bool),
        "trust_checkpoint": Rule(bool),
        "allow_config_change": Rule(bool),
        "on_nonfinite": Rule(str, choices=("stop", "skip_step", "rollback")),
        "collective_timeout": Rule(
            float, low=1, why="seconds a collective may wait for a stalled peer before the run fails"
        ),
    },
    "data": {
        "seq_len": positive_int(),
        "batch_size": positive_int(),
        "global_batch_size": Rule(
            int, low=1, nullable=True, why="sequences per optimizer step over all ranks, or null"
        ),
        "val_percent": Rule(
            float,
            low=0,
            high=100,
            low_exclusive=True,
            high_exclusive=True,
            why="the rest of the data is the training split",
        ),
        "max_bytes": Rule(int, low=1, nullable=True),
        "dtype": Rule(str, choices=("uint16", "uint32"), nullable=True),
        "glob": Rule(str),
        "path": Rule(str, nullable=True),
        "val_path": Rule(str, nullable=True),
        "source": Rule(str, choices=("stdlib", "text", "memmap")),
        "mix": Rule(
            list, nullable=True, why="prepared sets with mixing weights: [{path: .../train.bin, weight: 0.7}, ...]"
        ),
    },
    "optim": {
        "name": Rule(str, choices=("adamw",)),
        "lr": Rule(float, low=0, high=1e30, low_exclusive=True, why="float32 holds it"),
        "min_lr": Rule(float, low=0),
        "weight_decay": Rule(float, low=0),
        "betas": Rule(list, length=2),
        "eps": Rule(float, low=0, low_exclusive=True),
        "warmup_steps": Rule(int, low=0),
        "schedule": Rule(str, choices=("cosine", "constant")),
        "grad_clip": Rule(float, low=0, why="0 disables clipping"),
        "master_weights": Rule(bool),
        "master_remainders": Rule(bool),
        "moments_dtype": Rule(str, choices=("float32", "bfloat16")),
    },
    "parallel": {
        "dp_replicate": positive_int(),
        "dp_shard": Rule(int, low=-1),
        "tp": positive_int(),
        "cp": positive_int(),
        "pp": positive_int(),
        "pp_schedule": Rule(str, choices=("gpipe", "1f1b", "interleaved_1f1b", "interleaved_zb", "zbv")),
        "pp_microbatches": Rule(int, low=-1, why="-1: one per pipeline stage"),
        "ep": positive_int(),
        "backend": Rule(str, choices=("auto", "nccl", "gloo")),
        "overlap_chunks": positive_int(),
        "overlap_shared": Rule(bool),
        "dispatcher": Rule(str, choices=("auto", "local", "alltoall", "capacity", "symm_mem")),
        "capacity_factor": Rule(float, low=0, low_exclusive=True),
        "capacity_warn_drop": Rule(float, low=0, high=1),
    },
    "experts": {"impl": Rule(str), "gather_rows": Rule(bool)},
    # the counts of every launcher choice (each choice has only some of them; launch_world reads them)
    "launcher": {
        "nproc": positive_int("processes per node; torchrun's 'auto' is not taken: name the count"),
        "nnodes": positive_int(),
        "max_restarts": Rule(int, low=0),
        "nodes": positive_int(),
        "nproc_per_node": positive_int("training processes per node"),
        "gpus_per_node": Rule(int, low=0),
        "num_workers": positive_int(),
        "max_failures": Rule(int, low=-1, why="-1 retries without limit"),
        "signal_seconds": Rule(int, low=1),
    },
    "tracking": {
        "project": Rule(str),
        "run_name": Rule(str, nullable=True),
        "mlflow_tracking_uri": Rule(str, nullable=True),
    },
}


def _describe(rule: Rule) -> str:
    if rule.choices:
        return "one of " + ", ".join(map(str, rule.choices))
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}[rule.kind]
    if rule.kind is list and rule.length:
        kind = f"a list of {rule.length} numbers"
    bounds = []
    if rule.low is not None:
        bounds.append(f"{'>' if rule.low_exclusive else '>='} {rule.low:g}")
    if rule.high is not None:
        bounds.append(f"{'<' if rule.high_exclusive else '<='} {rule.high:g}")
    return kind + (" " + " and ".join(bounds) if bounds else "")


def _ok(value: Any, rule: Rule) -> bool:
    if value is None:
        return rule.nullable
    if rule.kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False  # true is not 1 here
    if rule.kind is int and not isinstance(value, int):
        return False
    if rule.kind is float and (not isinstance(value, (int, float)) or not math.isfinite(value)):
        return False
    if rule.kind is str and not isinstance(value, str):
        return False
    if rule.kind is list:
        if not isinstance(value, (list, tuple)) or (rule.length and len(value) != rule.length):
            return False
        if rule.length is None:  # a list of records, checked by its consumer
            return True
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 for v in value)
    if rule.choices is not None and value not in rule.choices:
        return False
    if rule.low is not None and (value <= rule.low if rule.low_exclusive else value < rule.low):
        return False
    return rule.high is None or (value < rule.high if rule.high_exclusive else value <= rule.high)


def check(cfg) -> None:
    """Refuse the first config value that does not match its key's rule."""
    if hasattr(cfg, "get") and cfg.get("logger", "tensorboard") != "tensorboard":
        from moeflow.launch.trackers import chosen

        chosen(list(cfg.logger) if type(cfg.logger).__name__ == "ListConfig" else cfg.logger)
    for group, rules in SCHEMA.items():
        node = cfg.get(group) if hasattr(cfg, "get") else None
        if node is None:
            continue
        for key, rule in rules.items():
            if key not in node:
                continue
            value = node[key]
            if hasattr(value, "_content") or type(value).__name__ == "ListConfig":  # omegaconf containers
                value = list(value)
            if not _ok(value, rule):
                why = f" ({rule.why})" if rule.why else ""
                if rule.kind is list and key == "betas":
                    why = " (each in [0, 1), e.g. [0.9, 0.95])"
                raise ConfigError(f"{group}.{key}={value!r} is not valid: it takes {_describe(rule)}{why}")
