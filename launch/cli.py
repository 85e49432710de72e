"""The `moeflow` command: `moeflow <subcommand> [args]`, and the one error handler.

Each subcommand lives in its own module and is imported only when used, so `moeflow
train` does not pay for Ray or DeepSpeed imports. A subcommand signals bad input by
raising `moeflow.moe.errors.MoeflowError` (or a subclass); `main` prints it as
`moeflow <command>: error: <message>` and exits with its code (2), no traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import NoReturn

# name -> (module, function taking the remaining argv, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "train": (
        "moeflow.launch.train_command",
        "main",
        "train an MoE LM (Hydra overrides follow; `moeflow train --help`)",
    ),
    "bench": ("moeflow.launch.bench", "main", "benchmarks (`moeflow bench --help`)"),
    "convert": (
        "moeflow.launch.convert",
        "main",
        "convert checkpoints: Hugging Face MoE / DeepSpeed / megatron-core <-> moeflow (`moeflow convert --help`)",
    ),
    "upcycle": (
        "moeflow.launch.upcycle.cli",
        "main",
        "dense checkpoint (moeflow or Hugging Face) -> MoE (`moeflow upcycle --help`)",
    ),
    "slurm": (
        "moeflow.launch.launchers.slurm",
        "main",
        "submit/status/cancel/logs of Slurm jobs (`moeflow slurm --help`)",
    ),
    "ray": (
        "moeflow.launch.launchers.ray_train",
        "main",
        "train on a Ray cluster: launch/submit/wait (`moeflow ray --help`)",
    ),
    "generate": (
        "moeflow.launch.inference",
        "main_generate",
        "continue a prompt with a trained model (`moeflow generate RUN --prompt ...`)",
    ),
    "eval": (
        "moeflow.launch.inference",
        "main_eval",
        "loss / perplexity and expert load of a model on a token file (`moeflow eval RUN --data ...`)",
    ),
    "data": (
        "moeflow.launch.data_prepare",
        "main",
        "tokenize a corpus for data=memmap (`moeflow data prepare --help`)",
    ),
    "prepare": (
        "moeflow.launch.prepare",
        "main",
        "build what a first run would build on its first step (`moeflow prepare deepspeed-ops`)",
    ),
    "stats": (
        "moeflow.launch.stats_table",
        "main",
        "per-layer routing statistics table of a run (`moeflow stats RUN_DIR [--step N]`)",
    ),
}


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("moeflow")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def usage() -> str:
    lines = ["usage: moeflow <command> [args]      (moeflow --version)", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in SUBCOMMANDS.items()]
    lines += ["", "docs: README.md and docs/ in the repository"]
    return "\n".join(lines)


RANK0_GRACE_S = 30.0  # how long a quiet rank waits for rank 0 to report the same config error


def report_error(command: str, err: Exception) -> NoReturn:
    """The one way a user error leaves moeflow: one line on stderr naming the fix, then exit."""
    import os

    from moeflow.moe.errors import ConfigError

    message = " ".join(str(err).split()) or type(err).__name__
    rank = os.environ.get("RANK", "0")
    if rank != "0" and isinstance(err, ConfigError):  # under torchrun every rank checks the same config: rank 0 says it
        import time

        time.sleep(
            RANK0_GRACE_S
        )  # exiting first would have torchrun stop rank 0 before it prints; it stops this rank instead
        sys.exit(getattr(err, "exit_code", 2))
    who = f" (rank {rank})" if rank != "0" else ""  # a problem only this rank met (its RNG file, its shard)
    print(f"moeflow{' ' + command if command else ''}: error{who}: {message}", file=sys.stderr, flush=True)
    sys.exit(getattr(err, "exit_code", 2))


def main(argv: list[str] | None = None) -> None:
    from moeflow.moe.errors import MoeflowError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] in ("-V", "--version", "version"):
        print(f"moeflow {version()}")
        return
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        report_error("", MoeflowError(f"unknown command {name!r}; commands: {', '.join(SUBCOMMANDS)} (moeflow --help)"))
    module, func, _ = SUBCOMMANDS[name]
    from .parent_death import exit_with_launcher

    exit_with_launcher()  # a rank under torchrun dies with its launcher
    try:
        getattr(importlib.import_module(module), func)(rest)
    except MoeflowError as e:
        report_error(name, e)
    except KeyboardInterrupt:  # a second Ctrl-C (the first stops a training run cleanly, with a checkpoint)
        print(f"moeflow {name}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
