"""`moeflow train launcher=local|slurm|ray`: hand the run to a launcher instead of running here.

Each launcher is a thin layer over the real tool: `local` (torchrun), `slurm` (sbatch/srun),
`ray_train` (Ray Train, `ray job`). The processes they start run the same overrides with
MOEFLOW_LAUNCHED=1, so they train in-process instead of launching again.
"""

from __future__ import annotations

import os
import sys

from moeflow.moe.errors import ConfigError

from .common import LAUNCHED_ENV, launcher_name


def launch_elsewhere(args: list[str]) -> bool:
    """Start the run through the chosen launcher; False if it should run in this process."""
    name = launcher_name(args)
    if name == "none" or os.environ.get(LAUNCHED_ENV) == "1":
        return False
    multirun = [a for a in args if a in ("-m", "--multirun")]
    if multirun and name == "slurm":  # a sweep: one array task per combination
        from .slurm import submit

        return _exit(submit([a for a in args if a not in multirun], multirun=True))
    if multirun:
        raise ConfigError(
            f"launcher={name} runs one training; sweep with `moeflow slurm submit -m ...` (a job array) or run each point yourself"
        )
    if name == "local":
        from .local import launch
    elif name == "slurm":
        from .slurm import submit_from_train as launch
    elif name == "ray":
        from .ray_train import launch_from_train as launch
    else:
        return False  # preflight already rejected unknown launchers
    return _exit(launch(args))


def _exit(code: int) -> bool:
    if code:
        sys.exit(code)
    return True
