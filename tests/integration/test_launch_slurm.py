"""moeflow slurm on a real single-node Slurm cluster (munge + slurmctld + slurmd), started here if needed."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.launch import BIN, QUICK, free_port, job_id, job_state, moeflow, slurm_cluster, val_losses, wait_job
from helpers.timeouts import limit

pytestmark = [pytest.mark.slurm]

GPU_CLUSTER = [
    "launcher.nodes=4",
    "launcher.nproc_per_node=8",
    "launcher.gpus_per_node=8",
    "launcher.partition=gpu",
    "launcher.account=proj42",
    "launcher.time=2-00:00:00",
    "launcher.exclusive=true",
    "launcher.extra_sbatch=['--mail-type=END']",
    "launcher.setup=['module load cuda/12.4']",
]


@pytest.fixture(scope="module")
def slurm():
    slurm_cluster()


def cpu_job(tmp_path, *extra):
    """2 training processes on the 2-CPU node; a private rendezvous port (the machine is shared)."""
    return [
        "launcher.cpus_per_task=2",
        f"launcher.output_root={tmp_path / 'runs'}",
        f"launcher.rdzv_port={free_port()}",
        *extra,
    ]


# --- no cluster needed ---------------------------------------------------------------------------


def test_dry_run_prints_a_multi_node_gpu_script(tmp_path):
    done = moeflow(
        "slurm", "submit", "--dry-run", *GPU_CLUSTER, f"launcher.output_root={tmp_path}", "trainer.steps=1000"
    )
    assert done.returncode == 0, done.stderr
    script = done.stdout
    for line in [
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj42",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --exclusive",
        "#SBATCH --mail-type=END",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@120",
        f"#SBATCH --output={tmp_path}/%j.out",
        "module load cuda/12.4",
        "--nproc-per-node=8",
        "--rdzv-backend=c10d",
        "ARGS=(trainer.steps=1000 resume=auto)",
        f"RUN_DIR={tmp_path}/$RUN_ID",
    ]:
        assert line in script, line
    assert script.index("module load") < script.index("srun --kill-on-bad-exit")
    assert not (tmp_path / "sbatch").exists(), "--dry-run must not write or submit anything"
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_the_job_runs_the_interpreter_of_launcher_setups_environment(tmp_path):
    """With setup lines (a venv to activate, modules to load), the job runs `python3` as they leave it
    on PATH, not the interpreter of the machine that submitted; without, the submitting one."""
    venv = ["launcher.setup=['source ~/venvs/moeflow/bin/activate']", f"launcher.output_root={tmp_path}"]
    script = moeflow("slurm", "submit", "--dry-run", *venv).stdout
    assert "python3 -m torch.distributed.run" in script and sys.executable not in script
    assert script.index("source ~/venvs/moeflow/bin/activate") < script.index("python3 -m torch.distributed.run")
    plain = moeflow("slurm", "submit", "--dry-run", f"launcher.output_root={tmp_path}").stdout
    assert f"{sys.executable} -m torch.distributed.run" in plain
    pinned = moeflow("slurm", "submit", "--dry-run", *venv, "launcher.python=/opt/py/bin/python").stdout
    assert "/opt/py/bin/python -m torch.distributed.run" in pinned


def test_dry_run_multirun_is_a_job_array_over_hydra_sweep(tmp_path):
    done = moeflow(
        "slurm",
        "submit",
        "--dry-run",
        "-m",
        "model.num_experts=4,8",
        "optim.lr=1e-3,3e-3",
        f"launcher.output_root={tmp_path}",
    )
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --array=0-3" in done.stdout and f"#SBATCH --output={tmp_path}/%A_%a.out" in done.stdout
    assert "mapfile -d '' -t SWEEP <" in done.stdout and "eval " not in done.stdout  # read as data, never evaluated
    # array tasks may share a node: each needs its own rendezvous port (one port joined two jobs' stores)
    assert "RDZV_PORT=$((20000 + SLURM_JOB_ID % 20000))" in done.stdout and '"$HEAD_NODE:$RDZV_PORT"' in done.stdout
    fixed = moeflow(
        "slurm",
        "submit",
        "--dry-run",
        "-m",
        "model.num_experts=4,8",
        "launcher.rdzv_port=31000",
        f"launcher.output_root={tmp_path}",
    )
    assert "RDZV_PORT=$((31000 + ${SLURM_ARRAY_TASK_ID:-0}))" in fixed.stdout
    tasks = [line for line in done.stderr.splitlines() if line.startswith("# array task")]
    assert tasks == [
        "# array task 0: model.num_experts=4 optim.lr=0.001 resume=auto",
        "# array task 1: model.num_experts=4 optim.lr=0.003 resume=auto",
        "# array task 2: model.num_experts=8 optim.lr=0.001 resume=auto",
        "# array task 3: model.num_experts=8 optim.lr=0.003 resume=auto",
    ]


@pytest.mark.parametrize("template, expect", [("srun", "RANK=$SLURM_PROCID"), ("ray", "ray launch")])
def test_dry_run_other_templates(tmp_path, template, expect):
    done = moeflow(
        "slurm",
        "submit",
        "--dry-run",
        f"launcher.template={template}",
        "launcher.nodes=2",
        f"launcher.output_root={tmp_path}",
    )
    assert done.returncode == 0, done.stderr
    assert expect in done.stdout and subprocess.run(["bash", "-n"], input=done.stdout, text=True).returncode == 0


def test_missing_template_variable_names_the_fix(tmp_path):
    template = tmp_path / "mine.sbatch.j2"
    template.write_text("#!/bin/bash\n#SBATCH --nodes={{ nodes }}\nsrun --container-image={{ image }} true\n")
    done = moeflow("slurm", "submit", "--dry-run", f"launcher.template={template}")
    assert done.returncode == 2
    assert "uses the variable 'image'" in done.stderr and "+launcher.vars.image=" in done.stderr
    ok = moeflow("slurm", "submit", "--dry-run", f"launcher.template={template}", "+launcher.vars.image=pytorch.sqsh")
    assert ok.returncode == 0 and "--container-image=pytorch.sqsh" in ok.stdout, ok.stderr


def test_unknown_template_and_bad_override(tmp_path):
    done = moeflow("slurm", "submit", "--dry-run", "launcher.template=nope")
    assert done.returncode == 2 and "choose one of ray, srun, torchrun" in done.stderr
    done = moeflow("slurm", "submit", "--dry-run", "launcher.nodez=2")
    assert done.returncode == 2 and "unknown config key 'launcher.nodez'" in done.stderr


def test_sbatch_not_on_path_names_the_fix(tmp_path):
    done = moeflow("slurm", "submit", f"launcher.output_root={tmp_path}", env={"PATH": BIN})
    assert done.returncode == 2
    assert "`sbatch` is not on PATH" in done.stderr and "apt-get install slurm-client" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# --- on the real cluster -------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_submit_two_rank_training_to_completion(slurm, tmp_path):
    done = moeflow("slurm", "submit", *QUICK, *cpu_job(tmp_path, "launcher.nproc_per_node=2"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job = job_id(done.stdout)
    assert f"log: {tmp_path / 'runs' / job}.out" in done.stdout
    status = moeflow("slurm", "status", job)
    assert status.returncode == 0 and f"job {job}:" in status.stdout
    assert wait_job(job, limit(180)) == "COMPLETED", moeflow("slurm", "logs", job).stdout[-3000:]
    log = moeflow("slurm", "logs", job).stdout
    assert "rank 0/2 up" in log and "rank 1/2 up" in log
    losses = val_losses(log)
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2], losses
    run_dir = tmp_path / "runs" / job  # keyed by the job id
    assert (run_dir / "checkpoints" / "step_00000010").is_dir()
    assert "COMPLETED" in moeflow("slurm", "status", job).stdout


@pytest.mark.xfail(
    strict=False,
    reason="watching a teardown hang (3 of 14 runs before ranks barriered before destroying the "
    "process group; 11 of 11 passed since): drop this mark once it stays green",
)
def test_srun_template_one_task_per_rank(slurm, tmp_path):
    done = moeflow(
        "slurm",
        "submit",
        *QUICK,
        "trainer.steps=4",
        "trainer.eval_every=0",
        *cpu_job(tmp_path, "launcher.template=srun", "launcher.nproc_per_node=2", "launcher.cpus_per_task=1"),
        cwd=tmp_path,
    )
    job = job_id(done.stdout)
    try:
        assert wait_job(job, limit(90)) == "COMPLETED", moeflow("slurm", "logs", job).stdout[-3000:]
    finally:
        moeflow("slurm", "cancel", job)  # a hung job must not hold the node for the tests after it
    log = moeflow("slurm", "logs", job).stdout
    assert "rank 0/2 up" in log and "rank 1/2 up" in log and "world 2" in log


def test_cancel_a_running_job(slurm, tmp_path):
    done = moeflow(
        "slurm", "submit", *QUICK, "trainer.steps=100000", *cpu_job(tmp_path, "launcher.cpus_per_task=1"), cwd=tmp_path
    )
    job = job_id(done.stdout)
    wait_job(job, limit(60), until=("RUNNING",))
    cancelled = moeflow("slurm", "cancel", job)
    assert cancelled.returncode == 0 and f"cancelled job {job}" in cancelled.stdout
    assert wait_job(job, limit(60)) == "CANCELLED"
    assert "CANCELLED" in moeflow("slurm", "status", job).stdout


@pytest.mark.slow
def test_preemption_checkpoints_requeues_and_resumes(slurm, tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@N sends) -> checkpoint, requeue, resume=auto."""
    overrides = [*QUICK, "trainer.steps=300", "trainer.eval_every=0", "trainer.ckpt_every=1000", "trainer.log_every=1"]
    done = moeflow("slurm", "submit", *overrides, *cpu_job(tmp_path, "launcher.nproc_per_node=2"), cwd=tmp_path)
    job = job_id(done.stdout)
    run_dir = tmp_path / "runs" / job
    stats = run_dir / "routing_stats.jsonl"  # rank 0 appends a line per MoE layer at every step
    deadline = time.monotonic() + limit(120)
    while not (stats.exists() and stats.read_text().count("\n") >= 10):
        assert time.monotonic() < deadline and job_state(job) in ("PENDING", "RUNNING"), job_state(job)
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    deadline = time.monotonic() + limit(120)
    while "Restarts=1" not in subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, "the job was not requeued"
        time.sleep(0.5)
    wait_job(job, limit(120), until=("PENDING", "RUNNING", "COMPLETED"))  # the old step ends, the job is queued again
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])  # skip Slurm's requeue hold-off
    assert wait_job(job, limit(180)) == "COMPLETED", moeflow("slurm", "logs", job).stdout[-3000:]
    log = moeflow("slurm", "logs", job).stdout
    assert "SIGUSR1 at step" in log and "requeued" in log
    preempted_at = int(log.split("SIGUSR1 at step ")[1].split(":")[0])
    assert 0 < preempted_at < 300
    assert f"resumed from {run_dir}/checkpoints/step_{preempted_at:08d} at step {preempted_at}" in log
    assert (run_dir / "checkpoints" / "step_00000300").is_dir()


def ray_processes_of(job: str) -> list[str]:
    """Command lines of live processes that belong to this job's Ray cluster (its private temp dir)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"/tmp/ray-{job}" in cmd and "session" in cmd or f"--temp-dir=/tmp/ray-{job}" in cmd:
            found.append(f"{proc.name}: {cmd[:200]}")
    return found


@pytest.mark.ray
@pytest.mark.slow
def test_ray_on_slurm_starts_trains_and_tears_down(slurm, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]'")
    done = moeflow(
        "slurm", "submit", "launcher=ray", *QUICK, *cpu_job(tmp_path, "launcher.nproc_per_node=2"), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    job = job_id(done.stdout)
    state = wait_job(job, limit(300))
    log = moeflow("slurm", "logs", job).stdout
    assert state == "COMPLETED", log[-4000:]
    assert "1 Ray nodes up" in log and "Ray Train with 2 workers" in log
    assert "rank 0/2 up" in log and "rank 1/2 up" in log and "moeflow: done:" in log
    losses = val_losses(log)
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert "stopping the Ray cluster" in log
    deadline = time.monotonic() + limit(30)
    while (left := ray_processes_of(job)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, left


def test_sweep_runs_as_a_job_array(slurm, tmp_path):
    """`moeflow train -m launcher=slurm a=1,2` == `moeflow slurm submit -m a=1,2`: one array task per point."""
    done = moeflow(
        "train",
        "-m",
        "launcher=slurm",
        *QUICK,
        "trainer.steps=2",
        "trainer.eval_every=0",
        "trainer.ckpt_every=2",
        "model.num_experts=2,4",
        *cpu_job(tmp_path, "launcher.cpus_per_task=1"),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "(array of 2)" in done.stdout
    job = job_id(done.stdout)
    for task in ("0", "1"):
        assert wait_job(f"{job}_{task}", 180) == "COMPLETED", moeflow("slurm", "logs", f"{job}_{task}").stdout[-3000:]
    for task, experts in (("0", 2), ("1", 4)):
        run_dir = tmp_path / "runs" / f"{job}_{task}"
        assert f"model.num_experts={experts}" in (tmp_path / "runs" / f"{job}_{task}.out").read_text()
        assert (run_dir / "checkpoints" / "step_00000002").is_dir()


# --- hostile launcher fields: refused, or quoted so that nothing they hold runs --------------------

HOSTILE = "x$(touch INJECTED)\n#SBATCH --wrap=boom"
HOSTILE_FIELDS = {
    "job_name": HOSTILE,
    "partition": HOSTILE,
    "account": "a b",
    "qos": "q;touch INJECTED",
    "constraint": "c\ntouch INJECTED",
    "mem": "1G; touch INJECTED",
    "time": "1:00 $(touch INJECTED)",
    "output_root": "/tmp/out dir",
    "nodes": "1 $(touch INJECTED)",
    "nproc_per_node": "1 $(touch INJECTED); true",
    "gpus_per_node": "0;touch INJECTED",
    "cpus_per_task": "x",
    "signal_seconds": "-1",
    "rdzv_port": "1;touch INJECTED",
    "exclusive": "yes",
    "extra_sbatch": ["--mail-type=END\ntouch INJECTED"],
    "setup": ["echo ok\ntouch INJECTED"],
    "python": "python3\ntouch INJECTED",
    "srun_args": "--foo; touch INJECTED",
}
QUOTED_FIELDS = {  # free text that lands in the shell body: accepted, quoted
    "srun_args": "--container-image='x $(touch INJECTED) ; touch INJECTED' --export=ALL",
    "python": "/opt/my python/bin/python3 ; touch INJECTED",
}


@pytest.mark.parametrize("field", sorted(HOSTILE_FIELDS))
def test_hostile_launcher_fields_are_refused_in_one_line(tmp_path, field):
    value = HOSTILE_FIELDS[field]  # quoted for Hydra with its real characters (newlines included)
    quoted = lambda v: "'" + v.replace("'", "\\'") + "'"
    override = (
        f"launcher.{field}=[{', '.join(quoted(v) for v in value)}]"
        if isinstance(value, list)
        else f"launcher.{field}={quoted(value)}"
    )
    done = moeflow(
        "slurm",
        "submit",
        "--dry-run",
        override,
        f"launcher.output_root={tmp_path}" if field != "output_root" else "trainer.steps=1",
    )
    assert done.returncode == 2, done.stdout[-500:]
    err = done.stderr.strip()
    assert err.startswith("moeflow slurm: error: ") and "\n" not in err and f"launcher.{field}" in err, err


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "."])
def test_a_job_name_is_one_path_component(tmp_path, name):
    done = moeflow("slurm", "submit", "--dry-run", f"launcher.job_name={name!r}", f"launcher.output_root={tmp_path}")
    assert done.returncode == 2 and "launcher.job_name" in done.stderr, done.stderr[-500:]


@pytest.mark.parametrize(
    "bad, named",
    [
        ("trainer.steps=-5", "trainer.steps=-5"),
        ("trainer.device=tpu", "trainer.device='tpu'"),
        ("model.top_k=99", "model.top_k=99"),
    ],
)
def test_submit_runs_the_checks_moeflow_train_runs(tmp_path, bad, named):
    done = moeflow("slurm", "submit", "--dry-run", bad, f"launcher.output_root={tmp_path}")
    assert done.returncode == 2 and named in done.stderr and "\n" not in done.stderr.strip(), done.stderr[-800:]
    sweep = moeflow(
        "slurm",
        "submit",
        "--dry-run",
        "-m",
        f"trainer.steps=4,{bad.split('=', 1)[1]}" if bad.startswith("trainer.steps") else bad,
        "optim.lr=1e-3,3e-3",
        f"launcher.output_root={tmp_path}",
    )
    assert sweep.returncode == 2 and "sweep point" in sweep.stderr, sweep.stderr[-800:]
    assert not (tmp_path / "sbatch").exists()


def test_sweep_values_stay_words_whatever_they_hold(tmp_path):
    """A value with a newline, quotes and $(...) reaches the job as one word and runs nothing."""
    from moeflow.launch.launchers.slurm import write_sweep

    words = ["data.path=a\nb; touch INJECTED", "optim.lr=1e-3", "x='$(touch INJECTED)'", "resume=auto"]
    write_sweep(tmp_path / "s.sweep", [["a=1"], words])
    read = subprocess.run(
        [
            "bash",
            "-c",
            "mapfile -d '' -t SWEEP < \"$0\"/1.args; printf '%s\\0' \"${SWEEP[@]}\"",
            str(tmp_path / "s.sweep"),
        ],
        capture_output=True,
        cwd=tmp_path,
    )
    assert read.stdout.split(b"\0")[:-1] == [w.encode() for w in words]
    assert not (tmp_path / "INJECTED").exists()


@pytest.mark.parametrize("template", ["torchrun", "srun", "ray"])
def test_free_text_fields_are_quoted_and_nothing_they_hold_runs(tmp_path, template):
    """The rendered script parses (bash -n) and, run with every command on PATH replaced by a stub
    that only records its arguments, never runs what the values smuggled in (no `touch`)."""
    over = [f"launcher.{k}={v!r}" for k, v in QUOTED_FIELDS.items()]
    done = moeflow(
        "slurm", "submit", "--dry-run", f"launcher.template={template}", *over, f"launcher.output_root={tmp_path}"
    )
    assert done.returncode == 0, done.stderr
    script = tmp_path / "job.sh"
    script.write_text(done.stdout)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    stubs, calls = tmp_path / "stubs", tmp_path / "calls.log"
    stubs.mkdir()
    for tool in (
        "srun",
        "scontrol",
        "scancel",
        "python3",
        "python",
        "touch",
        "hostname",
        "head",
        "awk",
        "sed",
        "kill",
        "wait",
        "sleep",
        "/opt/my",
    ):
        stub = stubs / Path(tool).name
        stub.write_text(f'#!/bin/bash\necho "{Path(tool).name} $*" >> {calls}\n')
        stub.chmod(0o755)
    env = {
        "PATH": str(stubs),
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "n1",
        "SLURM_NNODES": "1",
        "SLURM_ARRAY_TASK_ID": "0",
    }
    subprocess.run(["/bin/bash", str(script)], env=env, cwd=tmp_path, capture_output=True, timeout=30)
    log = calls.read_text() if calls.exists() else ""
    assert "touch" not in [line.split()[0] for line in log.splitlines()], log
    assert not (tmp_path / "INJECTED").exists()
