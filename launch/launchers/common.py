"""What every launcher does to a `moeflow train` command line before starting processes elsewhere."""

from __future__ import annotations

from omegaconf import DictConfig

# Set in the launched processes: they train in-process instead of launching again.
LAUNCHED_ENV = "MOEFLOW_LAUNCHED"


def launcher_name(args: list[str]) -> str:
    for a in args:
        if a.startswith("launcher="):
            return a.split("=", 1)[1]
    return "none"


def without_launcher(args: list[str]) -> list[str]:
    """The training overrides alone: the launched processes run with launcher=none."""
    return [a for a in args if not a.lstrip("+~").startswith(("launcher=", "launcher."))]  # +, ++ and ~ forms too


def replace_run_dir(args: list[str], run_dir: str) -> list[str]:
    return [a for a in args if not a.startswith("hydra.run.dir=")] + [f"hydra.run.dir={run_dir}"]


def compose(args: list[str]) -> DictConfig:
    """The composed config (with `hydra`), with each problem as a one-line ConfigError."""
    from ..preflight import compose_checked

    return compose_checked([a for a in args if not a.startswith("-")])


def run_dir_of(cfg: DictConfig) -> str:
    """Resolve `hydra.run.dir` once, here, so every launched rank writes into the same dir."""
    return str(cfg.hydra.run.dir)
