"""`moeflow train launcher=local|slurm|ray`: hand the run to a launcher instead of running here.

The launcher starts the real processes (torchrun, sbatch, Ray Train); those run the same
overrides with MOEFLOW_LAUNCHED=1 so they train in-process instead of launching again.
"""
from __future__ import annotations

import os
import sys

from omegaconf import DictConfig

from .config import ConfigError

LAUNCHED_ENV = "MOEFLOW_LAUNCHED"


def launcher_name(args: list[str]) -> str:
    for a in args:
        if a.startswith("launcher="):
            return a.split("=", 1)[1]
    return "none"


def without_launcher(args: list[str]) -> list[str]:
    """The training overrides alone: the launched processes run with launcher=none."""
    return [a for a in args if not (a.startswith("launcher=") or a.startswith("launcher."))]


def replace_run_dir(args: list[str], run_dir: str) -> list[str]:
    return [a for a in args if not a.startswith("hydra.run.dir=")] + [f"hydra.run.dir={run_dir}"]


def compose(args: list[str]) -> DictConfig:
    """The composed config (with `hydra`), with each problem as a one-line ConfigError."""
    from .preflight import compose_checked

    return compose_checked([a for a in args if not a.startswith("-")])


def run_dir_of(cfg: DictConfig) -> str:
    """Resolve `hydra.run.dir` once, here, so every launched rank writes into the same dir."""
    return str(cfg.hydra.run.dir)


def launch_elsewhere(args: list[str]) -> bool:
    """Start the run through the chosen launcher; False if it should run in this process."""
    name = launcher_name(args)
    if name == "none" or os.environ.get(LAUNCHED_ENV) == "1":
        return False
    multirun = [a for a in args if a in ("-m", "--multirun")]
    try:
        if multirun and name == "slurm":  # a sweep: one array task per combination
            from .slurm import submit

            return _exit(submit([a for a in args if a not in multirun], multirun=True))
        if multirun:
            raise ConfigError(f"launcher={name} runs one training; sweep with `moeflow slurm submit -m ...` (a job array) or run each point yourself")
        if name == "local":
            from .local import launch
        elif name == "slurm":
            from .slurm import submit_from_train as launch
        elif name == "ray":
            from .ray_launch import launch_from_train as launch
        else:
            return False  # preflight already rejected unknown launchers
        return _exit(launch(args))
    except ConfigError as e:
        print(f"moeflow train: error: {e}", file=sys.stderr)
        sys.exit(2)


def _exit(code: int) -> bool:
    if code:
        sys.exit(code)
    return True
