"""Expert parallelism from the command line: layout errors, torchrun training, resume, bench smoke."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers.cli_runs import SMALL, moeflow_warnings, train_cmd
from helpers.cli_runs import run_cmd as _run
from helpers.timeouts import limit
from moeflow.moe.errors import ConfigError
from moeflow.parallel.mesh import ParallelDims


@pytest.mark.parametrize(
    "ep, experts, world, fix",
    [
        (3, 8, 6, "divides the number of experts"),
        (4, 8, 6, "does not divide dp_shard x tp = 6"),
        (2, 8, 1, "torchrun --nproc-per-node 2"),
        (0, 8, 2, "parallel.ep must be a positive integer"),
    ],
)
def test_impossible_layout_is_one_line_config_error(ep, experts, world, fix):
    with pytest.raises(ConfigError) as e:
        ParallelDims(world=world, ep=ep).check_model(experts, 1, 1)
    assert fix in str(e.value) and "\n" not in str(e.value)


def test_train_cli_rejects_impossible_ep_before_starting(capsys, tmp_path):
    from moeflow.launch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "parallel.ep=3", f"hydra.run.dir={tmp_path / 'run'}"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeflow train: error: parallel.ep=3 does not divide model.num_experts=8") and "\n" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.multiprocess
def test_a_config_error_under_raw_torchrun_is_said_once(tmp_path):
    """Every rank checks the same config; rank 0 says it. A quiet rank that exited first used to have
    torchrun stop rank 0 before it printed: the error was said by nobody."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [
            *train_cmd(nproc=2),
            "parallel.ep=2",
            "model.num_experts=3",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=limit(120),
    )
    assert p.returncode != 0
    said = [ln for ln in p.stderr.splitlines() if ln.startswith("moeflow train: error")]
    assert said == [
        "moeflow train: error: parallel.ep=2 does not divide model.num_experts=3; pick an ep that divides the number of experts"
    ], p.stderr[-2000:]


def test_torchrun_ranks_agree_on_run_dir(monkeypatch, capsys):
    from moeflow.launch.train_command import shared_run_dir

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc123")
    assert shared_run_dir(["x=1"]) == ["x=1", "hydra.run.dir=outputs/torchrun/abc123"]
    assert shared_run_dir(["hydra.run.dir=here"]) == ["hydra.run.dir=here"]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(ConfigError, match="pass hydra.run.dir="):
        shared_run_dir([])


@pytest.mark.multiprocess
def test_torchrun_ep2_trains_logs_and_resumes_with_other_ep_sizes(tmp_path):
    run = tmp_path / "run"
    first = _run(
        [
            *train_cmd(nproc=2),
            "parallel.ep=2",
            "trainer.steps=4",
            "trainer.log_every=2",
            "trainer.eval_every=2",
            "trainer.ckpt_every=2",
            *SMALL,
            f"hydra.run.dir={run}",
        ],
        tmp_path,
    )
    log = (run / "train.log").read_text()
    assert "world 2" in log and "step 4: train loss" in log and "saved checkpoint" in log
    assert not moeflow_warnings(first.stderr), moeflow_warnings(
        first.stderr
    )  # e.g. the deprecated torch.distributed.nn all_reduce
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(line) for line in (run / "routing_stats.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {2, 4}
    # aggregated over both ranks: 2 ranks x 2 sequences x 32 tokens x top-2, nothing dropped
    assert all(sum(r["tokens_per_expert"]) == 2 * 2 * 32 * 2 for r in rows), [sum(r["tokens_per_expert"]) for r in rows]
    ckpt = run / "checkpoints" / "step_00000004"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["config"]["parallel"]["ep"] == 2

    # the gathered checkpoint resumes in one process (a different EP size), full expert shapes
    run2 = tmp_path / "run2"
    _run(
        [
            *train_cmd(),
            f"resume={run}",
            "trainer.steps=5",
            "trainer.eval_every=0",
            *SMALL,
            f"hydra.run.dir={run2}",
        ],
        tmp_path,
    )
    log2 = (run2 / "train.log").read_text()
    assert "resumed from" in log2 and "step_00000004" in log2 and '"step": 5' in log2

    # and the single-process checkpoint resumes under EP=2 again (resharded on load)
    run3 = tmp_path / "run3"
    _run(
        [
            *train_cmd(nproc=2),
            "parallel.ep=2",
            f"resume={run2}",
            "trainer.steps=6",
            "trainer.eval_every=0",
            *SMALL,
            f"hydra.run.dir={run3}",
        ],
        tmp_path,
    )
    log3 = (run3 / "train.log").read_text()
    assert "resumed from" in log3 and "step_00000005" in log3 and '"step": 6' in log3


@pytest.mark.multiprocess
def test_bench_ep_smoke_on_gloo(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "moeflow.launch.cli",
            "bench",
            "ep",
            "--d-model",
            "32",
            "--d-ff",
            "48",
            "--experts",
            "8",
            "--top-k",
            "2",
            "--tokens",
            "256",
            "--warmup",
            "1",
            "--iters",
            "2",
            "--json",
            str(tmp_path / "ep.json"),
        ],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=limit(240),
    )
    # exit 0: a rank once aborted at exit ("terminate called without an active exception", ~1 run in 10)
    # while process groups held by uncollected FSDP modules were torn down (parallel/distributed.py)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "ep.json").read_text())
    assert result["ep"] == 2 and result["step_ms_ep"] > 0 and result["step_ms_single"] > 0
    assert 0 < result["weak_scaling_efficiency"] and result["exchange_bytes_per_step"] > 0
    assert result["host_syncs_dispatcher_per_step"] == 1 and result["exchange_bus_GBps"] > 0
    assert "weak-scaling efficiency" in proc.stdout
