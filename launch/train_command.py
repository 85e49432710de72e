"""`moeflow train [overrides]`: check the command line, hand it to a launcher or run it here.

Order matters for a fast answer: the overrides are composed and checked (Hydra only, no
torch) before anything heavy is imported, so a typo fails in about a second; then the
semantic checks; then a launcher (launcher=local|slurm|ray) starts the real processes, or
Hydra runs `train()` in this process with the run dir as its output dir.
"""

from __future__ import annotations

import os
import sys

from moeflow.moe.errors import ConfigError


def shared_run_dir(args: list[str]) -> list[str]:
    """Under torchrun every rank composes its own config; they must agree on the run dir.

    Hydra's default dir is a timestamp, which ranks may see differently. Without an
    explicit hydra.run.dir, use one derived from torchrun's rendezvous id (shared by all
    ranks; `--standalone` or `--rdzv-id` sets it), else refuse with the fix.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or any(a.startswith("hydra.run.dir=") for a in args):
        return args
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    if run_id in ("", "none"):
        raise ConfigError(
            "under torchrun all ranks need the same run dir; pass hydra.run.dir=... (or launch with torchrun --standalone)"
        )
    return [*args, f"hydra.run.dir=outputs/torchrun/{run_id}"]


def main(args: list[str]) -> None:
    from .launchers import launch_elsewhere
    from .preflight import preflight

    if any(a in ("-h", "--help") for a in args):
        from .train_help import help_text

        print(help_text())
        return
    args = shared_run_dir(args)
    preflight(args)
    if launch_elsewhere(args):  # launcher=local|slurm|ray: start the run's processes there
        return
    from .train import hydra_main  # torch and the trainer: only now

    sys.argv = ["moeflow-train", *args]
    hydra_main()
