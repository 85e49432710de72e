"""`moeflow train launcher=local launcher.nproc=N`: N processes on this machine via torchrun.

A thin layer over torchrun's elastic launcher (`torch.distributed.run`, in-process): the
run dir is resolved once here and passed to every rank as `hydra.run.dir`.
"""

from __future__ import annotations

import os

from moeflow.moe.errors import ConfigError, RunFailed

from .common import LAUNCHED_ENV, compose, replace_run_dir, run_dir_of, without_launcher


def torchrun_argv(launcher, train_args: list[str], run_dir=None) -> list[str]:
    argv = [f"--nproc-per-node={launcher.nproc}", f"--max-restarts={launcher.max_restarts}"]
    if launcher.rdzv_endpoint:  # several machines, each running this same command
        argv += [
            f"--nnodes={launcher.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={launcher.rdzv_endpoint}",
            f"--rdzv-id={launcher.rdzv_id}",
        ]
    else:
        if int(launcher.nnodes) != 1:
            raise ConfigError(
                f"launcher.nnodes={launcher.nnodes} needs launcher.rdzv_endpoint=HOST:PORT (the first node) on every node"
            )
        argv += ["--standalone"]
    if launcher.log_dir:
        argv += [f"--log-dir={launcher.log_dir}", "--tee=3"]
    elif (
        run_dir is not None
    ):  # torchrun's own bookkeeping goes into the run, not a torchelastic_* folder left in the temp dir
        argv += [f"--log-dir={os.path.join(str(run_dir), 'torchrun')}"]
    return argv + ["-m", "moeflow.launch.cli", "train", *train_args]


def launch(args: list[str]) -> int:
    from torch.distributed.run import get_args_parser, run

    cfg = compose(args)
    run_dir = run_dir_of(cfg)
    argv = torchrun_argv(cfg.launcher, replace_run_dir(without_launcher(args), run_dir), run_dir)
    os.environ[LAUNCHED_ENV] = "1"
    print(f"moeflow: torchrun {' '.join(argv)}", flush=True)
    try:
        run(get_args_parser().parse_args(argv))
    except Exception as e:  # torchrun's ChildFailedError carries each rank's exit code and log
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RunFailed(
            f"launcher=local: {type(e).__name__}: {first} (see the rank logs above; run dir {run_dir})"
        ) from None
    print(f"moeflow: run dir {run_dir}")
    return 0
