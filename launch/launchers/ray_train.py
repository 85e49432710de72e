"""`moeflow ray launch|submit|wait`: training through Ray Train, a thin layer over its API.

launch  composes the config, connects to (or starts) a Ray cluster, and runs `train()` in a
        TorchTrainer (ScalingConfig from `launcher.*`, FailureConfig(max_failures)). Each
        checkpoint is reported to Ray Train, so a restarted worker group resumes from it.
submit  sends `moeflow ray launch ...` to a cluster as a Ray job (JobSubmissionClient) with a runtime env.
wait    blocks until N nodes have joined (used by the Ray-on-Slurm template).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import socket
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from moeflow.moe.errors import ConfigError, RunFailed

from .common import compose, run_dir_of, without_launcher

log = logging.getLogger("moeflow.ray")


def ray_args(args: list[str]) -> list[str]:
    """launcher=ray, the training overrides, then every launcher override in the form it was given: a new key
    needs Hydra's + (`+launcher.resources_per_worker.CPU=8` into the empty map), and the +, ++ and ~ forms
    were dropped silently."""
    return [
        "launcher=ray",
        *without_launcher([a for a in args if a != "launcher=ray"]),
        *[a for a in args if a.lstrip("+~").startswith("launcher.")],
    ]


def check_reachable(address: str | None, what: str = "launcher.address") -> None:
    """Fail in seconds, not minutes, when nothing listens at a HOST:PORT / ray:// / http:// address."""
    if address in (None, "", "auto", "local"):
        return
    url = urlparse(address if "://" in address else f"tcp://{address}")
    if not url.hostname or not url.port:
        if url.scheme in ("http", "https") and url.hostname:
            port = url.port or (443 if url.scheme == "https" else 80)
        else:
            raise ConfigError(f"{what}={address}: expected HOST:PORT, ray://HOST:PORT or auto")
    else:
        port = url.port
    try:
        with socket.create_connection((url.hostname, port), timeout=5):
            pass
    except OSError as e:
        raise ConfigError(
            f"cannot reach a Ray cluster at {address} ({e.strerror or e}): start one with "
            f"`ray start --head`, or fix {what} (auto = the cluster this node belongs to)"
        ) from None


def connect(address: str | None) -> None:
    import ray

    check_reachable(address)
    try:
        if address in (None, "", "local"):
            ray.init(include_dashboard=False, log_to_driver=True)  # a private local cluster for this run
        else:
            ray.init(address=address, log_to_driver=True)
    except ConnectionError as e:
        raise ConfigError(
            f"cannot connect to Ray at {address}: {str(e).splitlines()[0]}; start a cluster with "
            f"`ray start --head` or set launcher.address (token auth: the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token)"
        ) from None


def check_capacity(launcher: DictConfig) -> dict:
    """More workers than the cluster can hold would make Ray Train wait forever: say so now."""
    import ray

    per_worker = dict(OmegaConf.to_container(launcher.resources_per_worker, resolve=True)) or {}
    if not per_worker:
        per_worker = {"GPU": 1} if launcher.use_gpu else {"CPU": 1}
    elif launcher.use_gpu:
        per_worker.setdefault("GPU", 1)
    have = ray.cluster_resources()
    for res, amount in per_worker.items():
        need = amount * int(launcher.num_workers)
        if need > have.get(res, 0):
            raise ConfigError(
                f"launcher.num_workers={launcher.num_workers} needs {need:g} {res} but the Ray cluster has "
                f"{have.get(res, 0):g}: lower launcher.num_workers (or launcher.resources_per_worker) or add nodes"
            )
    return per_worker


def restart_checkpoint(run_dir: Path, launch_id: str, restored) -> Path | None:
    """After a worker-group restart: the newest of Ray Train's last reported checkpoint and the run
    dir's own (a worker can die after saving but before Ray Train registered its report)."""
    from .. import checkpoint as ckpt

    marker = run_dir / "ray_workers" / f"started-{launch_id}-rank{os.environ['RANK']}"
    restarted = marker.exists()
    marker.touch()
    if not restarted and restored is None:
        return None
    found = [p for p in (Path(restored.path) if restored else None, ckpt.find_checkpoint(run_dir)) if p is not None]
    return max(found, key=lambda p: ckpt.read_meta(p).get("step", 0)) if found else None


def _worker(config: dict) -> None:
    """One Ray Train worker: the plain trainer, with its checkpoints reported to Ray Train."""
    import ray.train

    from .. import run_hooks
    from ..train import train

    ctx = ray.train.get_context()
    os.environ.update(
        RANK=str(ctx.get_world_rank()),
        WORLD_SIZE=str(ctx.get_world_size()),
        LOCAL_RANK=str(ctx.get_local_rank()),
        MOEFLOW_RUN_ID=config["launch_id"],
    )  # a restarted worker group is the same run
    run_dir = Path(config["run_dir"])
    rank = ctx.get_world_rank()
    logging.basicConfig(
        level=logging.INFO, format=f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] - %(message)s", force=True
    )
    if rank == 0:
        handler = logging.FileHandler(run_dir / "train.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
    (run_dir / "ray_workers").mkdir(exist_ok=True)
    (run_dir / "ray_workers" / f"rank{rank}.pid").write_text(str(os.getpid()))

    cfg = OmegaConf.create(config["cfg"])
    resume_from = restart_checkpoint(run_dir, config["launch_id"], ray.train.get_checkpoint())
    if resume_from is not None:
        cfg.resume = str(resume_from)
        logging.getLogger("moeflow.ray").info("Ray Train restart: resuming from %s", resume_from)

    def report(step: int, metrics: dict, ckpt_dir: Path | None) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        checkpoint = ray.train.Checkpoint.from_directory(str(ckpt_dir)) if ckpt_dir is not None else None
        ray.train.report({**clean, "step": step}, checkpoint=checkpoint)

    run_hooks.set_checkpoint_reporter(report)
    try:
        train(cfg, run_dir)
    finally:
        run_hooks.set_checkpoint_reporter(None)


def launch(args: list[str]) -> int:
    """Compose, connect, run the TorchTrainer; returns a process exit code."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..config import validate

    cfg = compose(ray_args(args))
    run_dir = Path(run_dir_of(cfg)).resolve()
    launcher = cfg.launcher
    train_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    validate(train_cfg)
    connect(launcher.address)
    try:
        per_worker = check_capacity(launcher)
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(train_cfg, run_dir / "config.yaml")
        trainer = TorchTrainer(
            _worker,
            train_loop_config={
                "cfg": OmegaConf.to_container(train_cfg, resolve=True),
                "run_dir": str(run_dir),
                "launch_id": uuid.uuid4().hex,
            },
            scaling_config=ScalingConfig(
                num_workers=int(launcher.num_workers), use_gpu=bool(launcher.use_gpu), resources_per_worker=per_worker
            ),
            run_config=RunConfig(
                name="ray_train",
                storage_path=str(run_dir / "ray"),
                failure_config=FailureConfig(max_failures=int(launcher.max_failures)),
            ),
        )
        print(
            f"moeflow: Ray Train with {launcher.num_workers} workers ({per_worker} each), run dir {run_dir}", flush=True
        )
        try:
            result = trainer.fit()
        except Exception as e:  # noqa: BLE001 - Ray's TrainingFailedError wraps the worker's error
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RunFailed(
                f"training failed after {launcher.max_failures} restarts: {first} (worker logs above; run dir {run_dir})"
            ) from None
        print(f"moeflow: done: {result.metrics}; run dir {run_dir}", flush=True)
        return 0
    finally:
        ray.shutdown()


def launch_from_train(args: list[str]) -> int:
    return launch(args)


def submit(args: list[str], address: str | None, wait: bool, timeout: float) -> int:
    """Send `moeflow ray launch <overrides>` as a Ray job with the configured runtime env."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    from ..preflight import check_training_config

    cfg = compose(ray_args(args))  # checked here, before anything is sent
    check_training_config(ray_args(args))  # the checks `moeflow train` runs
    address = address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265"
    check_reachable(address, what="--address")
    try:
        client = JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ConfigError(
            f"cannot reach the Ray job server at {address}: {str(e).splitlines()[0]}; "
            f"pass --address http://HEAD:8265 (the dashboard address)"
        ) from None
    inner = [a for a in ray_args(args) if a != "launcher=ray" and not a.startswith("launcher.address=")]
    entrypoint = shlex.join(["python", "-m", "moeflow.launch.cli", "ray", "launch", *inner, "launcher.address=auto"])
    runtime_env = OmegaConf.to_container(cfg.launcher.runtime_env, resolve=True) or {}
    runtime_env.setdefault("env_vars", {}).setdefault("PYTHONUNBUFFERED", "1")
    job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    print(f"submitted Ray job {job} to {address}: {entrypoint}", flush=True)
    if not wait:
        print(f"follow it with: ray job logs --address {address} -f {job}")
        return 0
    deadline = time.monotonic() + timeout
    while (state := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if time.monotonic() > deadline:
            raise RunFailed(
                f"job {job} still {state} after {timeout:.0f} s; it keeps running (stop it with `ray job stop {job}`)"
            )
        time.sleep(1.0)
    print(client.get_job_logs(job), end="")
    print(f"Ray job {job}: {state}")
    if state != JobStatus.SUCCEEDED:
        raise RunFailed(f"Ray job {job} ended {state}; its log is above")
    return 0


def wait_for_nodes(address: str, nodes: int, timeout: float) -> int:
    """Wait for the head to listen (its srun step may start late on a busy node), then for N nodes."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        try:
            check_reachable(address)
            break
        except ConfigError as e:
            if time.monotonic() > deadline:
                raise RunFailed(f"the Ray head at {address} did not come up within {timeout:.0f} s ({e})") from None
            time.sleep(1.0)
    connect(address)
    try:
        while (alive := sum(1 for n in ray.nodes() if n.get("Alive"))) < nodes:
            if time.monotonic() > deadline:
                raise RunFailed(f"only {alive} of {nodes} nodes joined {address} within {timeout:.0f} s")
            time.sleep(1.0)
        print(f"moeflow: {alive} Ray nodes up at {address}: {ray.cluster_resources()}", flush=True)
        return 0
    finally:
        ray.shutdown()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="moeflow ray", description="Train through Ray Train on a Ray cluster.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("launch", help="run training through Ray Train (Hydra overrides follow)")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("submit", help="send the training as a Ray job (JobSubmissionClient)")
    p.add_argument(
        "--address", default=None, help="the job server (dashboard), e.g. http://HEAD:8265; default $RAY_ADDRESS"
    )
    p.add_argument("--no-wait", action="store_true", help="return after submitting")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job")
    p.add_argument("overrides", nargs="*")
    p = sub.add_parser("wait", help="wait until N nodes have joined a cluster")
    p.add_argument("--address", required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--timeout", type=float, default=300.0)
    a = parser.parse_args(argv)
    if a.cmd == "launch":
        launch(a.overrides)
    elif a.cmd == "submit":
        submit(a.overrides, a.address, not a.no_wait, a.timeout)
    else:
        wait_for_nodes(a.address, a.nodes, a.timeout)
