"""Checkpoints you can trust: a format with no pickle, complete-or-refused, checksums, one run per
run dir, changed settings named on resume, async saves committed as soon as they finish.

Each test breaks a real checkpoint the way it breaks in the field (a tampered file, a flipped
byte, a deleted file, a copy, a second run) and asserts what the user gets: a one-line
`MoeflowError` that names the fix, and no code run from the files.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import pytest
import torch

from helpers.config import TINY, compose_cfg
from helpers.timeouts import limit
from moeflow.launch import checkpoint as ckpt
from moeflow.launch.train import train
from moeflow.moe.errors import CheckpointError, ConfigError, MoeflowError
from moeflow.parallel.checkpoint import INDEX, read_full_tensors

QUIET = ("trainer.eval_every=0",)


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def cfg(*extra):
    return compose_cfg(*TINY, *QUIET, *extra)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("good") / "run"
    train(cfg("trainer.steps=2", "trainer.ckpt_every=1"), run)
    return run


def copy_run(good_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    return run, ckpt.find_checkpoint(run)


# -- no code from a checkpoint -------------------------------------------------------------
CHECKPOINT_FILES = [
    "meta.json",
    "trainer_state.json",
    "rng/rank_00000.json",
    INDEX,
    "state.json",
    "shard_00000.safetensors",
]


def commands(run, ckpt_dir, out):
    """Every command that reads a moeflow checkpoint, as a user runs it (in-process)."""
    from moeflow.launch import convert
    from moeflow.launch.inference import load_model

    return {
        "resume": lambda: train(cfg("trainer.steps=3", f"resume={ckpt_dir}"), out / "resumed"),
        "generate/eval": lambda: load_model(str(ckpt_dir)),
        "moeflow-to-safetensors": lambda: convert.main(["moeflow-to-safetensors", str(ckpt_dir), str(out / "st")]),
        "moeflow-to-megatron": lambda: convert.main(["moeflow-to-megatron", str(ckpt_dir), str(out / "meg")]),
        "moeflow-to-hf": lambda: convert.main(["moeflow-to-hf", str(ckpt_dir), str(out / "hf"), "--arch", "mixtral"]),
    }


@pytest.mark.parametrize("planted", CHECKPOINT_FILES + [".metadata", "trainer_state.pt", "rng/rank_00001.json"])
def test_a_pickle_planted_in_any_file_never_runs(tmp_path, good_run, planted):
    run, found = copy_run(good_run, tmp_path)
    marker = tmp_path / "PWNED"
    target = found / planted
    target.write_bytes(pickle.dumps(Payload(marker), protocol=4))
    outcomes = {}
    for name, command in commands(run, found, tmp_path / "out").items():
        try:
            command()
            outcomes[name] = "ran"
        except MoeflowError as e:
            outcomes[name] = str(e)
            assert "\n" not in str(e)
        except SystemExit as e:  # argparse / the CLI's own exit
            outcomes[name] = f"exit {e.code}"
        except ImportError as e:  # this machine's transformers cannot build the export's model: not about the file
            outcomes[name] = f"environment: {e}"
        assert not marker.exists(), f"{planted} ran code under {name}"
    if planted in CHECKPOINT_FILES:  # every file resume needs is read, and a pickle in it is refused
        assert outcomes["resume"] != "ran", outcomes


def test_a_legacy_pickle_checkpoint_needs_an_explicit_opt_in(tmp_path, good_run):
    """moeflow's earlier format (.metadata/.distcp, pickles): refused by name, loadable with trust."""
    import torch.distributed.checkpoint as dcp

    run, found = copy_run(good_run, tmp_path)
    tensors = read_full_tensors(found)
    legacy = tmp_path / "legacy" / "checkpoints" / "step_00000002"
    shutil.copytree(found, legacy)
    for p in list(legacy.glob("shard_*")) + [legacy / INDEX, legacy / "state.json"]:
        p.unlink()
    dcp.save({k: v for k, v in tensors.items() if k.startswith("model.")}, checkpoint_id=str(legacy), no_dist=True)
    marker = tmp_path / "PWNED"
    meta = json.loads((legacy / "meta.json").read_text())
    (legacy / "meta.json").write_text(json.dumps({**meta, "weights_only": True}))
    with pytest.raises(CheckpointError, match=r"pickle-based format.*trainer.trust_checkpoint=true"):
        train(cfg("trainer.steps=1", f"resume={legacy}"), tmp_path / "b")
    from moeflow.launch.inference import load_model

    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_model(str(legacy))
    model, _, _ = load_model(str(legacy), trust=True)  # the user's own old checkpoint, by choice
    assert torch.equal(model.state_dict()["embed.weight"], tensors["model.embed.weight"])
    (legacy / ".metadata").write_bytes(
        pickle.dumps(Payload(marker))
    )  # and a hostile one is still refused without the flag
    with pytest.raises(CheckpointError, match="pickle-based format"):
        train(cfg("trainer.steps=1", f"resume={legacy}"), tmp_path / "c")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../../outside.safetensors", "/etc/hostname", "shard_00000.safetensors/../../x"])
def test_an_index_naming_files_outside_the_checkpoint_is_refused(tmp_path, good_run, name):
    run, found = copy_run(good_run, tmp_path)
    index = json.loads((found / INDEX).read_text())
    index["files"][name] = index["files"].pop("shard_00000.safetensors")
    for t in index["tensors"].values():
        for c in t["chunks"]:
            c["file"] = name
    (found / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a shard of this folder"):
        train(cfg("trainer.steps=3", "resume=auto"), run)


# -- complete or refused ------------------------------------------------------------------------
def test_a_checkpoint_without_trainer_state_is_refused_not_restarted(tmp_path, good_run):
    run, found = copy_run(good_run, tmp_path)
    (found / "trainer_state.json").unlink()
    with pytest.raises(
        CheckpointError, match="incomplete: trainer_state.json is missing|no trainer_state.json.*incomplete"
    ):
        train(cfg("trainer.steps=3", "resume=auto"), run)
    assert (run / "checkpoints" / "step_00000001").is_dir()  # nothing overwritten


def test_a_missing_rng_file_is_refused(tmp_path, good_run):
    run, found = copy_run(good_run, tmp_path)
    (found / "rng" / "rank_00000.json").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: rng/rank_00000.json (\(RNG streams\) )?is missing"):
        train(cfg("trainer.steps=3", "resume=auto"), run)


def test_a_bak_copy_is_not_a_checkpoint(tmp_path, good_run):
    run, found = copy_run(good_run, tmp_path)
    shutil.copytree(found, found.with_name(found.name + ".bak"))
    assert ckpt.find_checkpoint(run) == found
    assert train(cfg("trainer.steps=3", "resume=auto"), run)["start_step"] == 2


@pytest.mark.parametrize("step", [12, -3, "x"])
def test_an_edited_step_is_refused(tmp_path, good_run, step):
    run, found = copy_run(good_run, tmp_path)
    state = json.loads((found / "trainer_state.json").read_text())
    (found / "trainer_state.json").write_text(json.dumps({**state, "step": step}))
    with pytest.raises(CheckpointError, match="step"):
        train(cfg("trainer.steps=20", "resume=auto"), run)


def test_flipped_bytes_in_a_shard_are_caught_by_the_checksum(tmp_path, good_run):
    run, found = copy_run(good_run, tmp_path)
    shard = found / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    for i in range(16):  # 16 bytes in the tensor data (after the header), the file size unchanged
        data[len(data) - 100 - 37 * i] ^= 0x5A
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its digest.*trainer.verify_checkpoint=false"):
        train(cfg("trainer.steps=3", "resume=auto"), run)
    out = train(
        cfg("trainer.steps=3", "resume=auto", "trainer.verify_checkpoint=false"), run
    )  # the user's explicit choice
    assert out["start_step"] == 2


def test_consolidated_weights_are_checksummed(tmp_path, good_run):
    from moeflow.launch import convert

    convert.main(["moeflow-to-safetensors", str(good_run), str(tmp_path / "st")])
    found = ckpt.find_checkpoint(tmp_path / "st")
    weights = found / ckpt.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its digest"):
        ckpt.load_model_state(found)


# -- changed settings on resume -----------------------------------------------------------------
@pytest.mark.parametrize(
    "override, named",
    [
        ("optim.lr=0.01", "optim.lr: 0.003 -> 0.01"),
        ("gate=sinkhorn", "gate.name: 'topk' -> 'sinkhorn'"),
        ("model.top_k=1", "model.top_k: 2 -> 1"),
        ("optim.weight_decay=0.5", "optim.weight_decay"),
    ],
)
def test_resume_with_changed_settings_is_refused_by_name(tmp_path, good_run, override, named):
    run, _ = copy_run(good_run, tmp_path)
    with pytest.raises(
        CheckpointError,
        match=f"differ from the checkpoint's.*{named}.*trainer.allow_config_change=true".replace("(", r"\("),
    ):
        train(cfg("trainer.steps=3", "resume=auto", override), run)


def test_allow_config_change_takes_the_new_learning_rate(tmp_path, good_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = copy_run(good_run, tmp_path)
    shutil.rmtree(run / "tensorboard")
    train(
        cfg(
            "trainer.steps=4",
            "resume=auto",
            "optim.lr=0.01",
            "optim.warmup_steps=0",
            "optim.schedule=constant",
            "trainer.allow_config_change=true",
        ),
        run,
    )
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("train/lr")}[4] == pytest.approx(0.01)


# -- one run per run dir ------------------------------------------------------------------------
def test_a_fresh_run_in_a_dir_with_checkpoints_is_refused(tmp_path, good_run):
    run, _ = copy_run(good_run, tmp_path)
    with pytest.raises(ConfigError, match="already holds checkpoints.*resume=auto.*new dir"):
        train(cfg("trainer.steps=3"), run)


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(tmp_path, good_run):
    import socket

    from moeflow.launch.run_lock import LOCK_FILE

    run, _ = copy_run(good_run, tmp_path)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}  # a live process on this host
    (run / LOCK_FILE).write_text(json.dumps(holder))
    with pytest.raises(ConfigError, match=f"in use by another run.*pid {os.getpid()}"):
        train(cfg("trainer.steps=3", "resume=auto"), run)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    (run / LOCK_FILE).write_text(json.dumps({**holder, "pid": int(gone)}))  # its process has exited
    assert train(cfg("trainer.steps=3", "resume=auto"), run)["start_step"] == 2
    assert not (run / LOCK_FILE).exists()  # released at the end


def test_two_runs_started_in_one_dir(tmp_path):
    """The second `moeflow train` into a dir in use exits 2 in one line while the first trains on."""
    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "moeflow.launch.cli",
        "train",
        *TINY,
        *QUIET,
        "trainer.steps=100000",
        "trainer.ckpt_every=0",
        f"hydra.run.dir={run}",
    ]
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + limit(60)
        while not (run / ".moeflow-run.lock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        second = subprocess.run([*args, "resume=auto"], capture_output=True, text=True, timeout=limit(120))
        assert first.poll() is None, "the first run stopped"
        assert second.returncode == 2, second.stderr[-2000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("moeflow train: error: run dir") and "in use by another run" in last, last
        assert (
            "resume=auto" not in (run / ".hydra" / "overrides.yaml").read_text()
        )  # refused before Hydra wrote into the dir
    finally:
        first.kill()
        first.wait()


# -- async saves ----------------------------------------------------------------------------
def test_a_completed_temp_checkpoint_is_promoted_not_deleted(tmp_path, good_run):
    """A crash after an async save finished but before it was renamed: its contents are complete."""
    run, found = copy_run(good_run, tmp_path)
    found.rename(ckpt.temp_dir(run, 2))
    assert train(cfg("trainer.steps=3", "resume=auto"), run)["start_step"] == 2


def test_an_async_save_is_committed_before_the_run_fails(tmp_path, monkeypatch):
    """The step after an async save fails: the save that was in flight is committed, not lost."""
    from moeflow.launch.engines.torch_engine import TorchEngine

    real = TorchEngine.optimizer_step
    calls = {"n": 0}

    def failing_step(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure after the step-2 save")
        return real(self)

    monkeypatch.setattr(TorchEngine, "optimizer_step", failing_step)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected"):
        train(cfg("trainer.steps=4", "trainer.ckpt_every=2", "trainer.async_checkpoint=true"), run)
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000002"]
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_resume_says_when_the_same_global_batch_draws_other_windows(tmp_path, good_run, caplog):
    """batch_size 4 x grad_accum 1 -> batch_size 2 x grad_accum 2: 4 sequences a step either way, other windows."""
    import logging

    run, _ = copy_run(good_run, tmp_path)
    with caplog.at_level(logging.WARNING, logger="moeflow.train"):
        train(cfg("trainer.steps=3", "resume=auto", "data.batch_size=2", "trainer.grad_accum=2"), run)
    assert any("trainer.grad_accum=1" in r.message and "other windows" in r.message for r in caplog.records), [
        r.message for r in caplog.records
    ]


def test_a_lock_from_another_host_is_taken_over_only_by_the_same_run(tmp_path, monkeypatch):
    """A Ray Train worker group restarted on another node (same run id) continues; another run waits."""
    from moeflow.launch.run_lock import LOCK_FILE, RunDirInUse, RunLock

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / LOCK_FILE).write_text(
        json.dumps({"host": "node-7", "pid": 4242, "run_id": "launch-abc", "started": time.time()})
    )
    monkeypatch.setenv("MOEFLOW_RUN_ID", "launch-other")
    with pytest.raises(RunDirInUse, match="host node-7, pid 4242"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv("MOEFLOW_RUN_ID", "launch-abc")
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


# -- what an adversarial pass found after the first version ------------------------------------
def test_a_live_holder_on_this_host_keeps_its_lock_whatever_its_run_id(tmp_path, monkeypatch):
    import socket

    from moeflow.launch.run_lock import LOCK_FILE, RunDirInUse, RunLock

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / LOCK_FILE).write_text(
        json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "run_id": "42", "started": time.time()})
    )
    monkeypatch.setenv("SLURM_JOB_ID", "42")  # two srun steps of one job pointed at one dir
    with pytest.raises(RunDirInUse):
        RunLock(tmp_path).acquire()


RACE = """
import sys, time
from pathlib import Path
from moeflow.launch.run_lock import RunLock, RunDirInUse
try:
    lock = RunLock(Path(sys.argv[1])).acquire()
except RunDirInUse:
    print("refused")
else:
    print("won", flush=True)
    time.sleep(3)
    lock.release()
"""


def test_racing_takeovers_of_a_stale_lock_leave_one_holder(tmp_path):
    import socket

    from moeflow.launch.run_lock import LOCK_FILE

    gone = int(
        subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    )
    for trial in range(3):
        d = tmp_path / f"t{trial}"
        d.mkdir()
        (d / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": gone, "started": 0}))
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", RACE, str(d)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
            for _ in range(4)
        ]
        outs = [p.communicate(timeout=limit(60))[0].strip() for p in procs]
        assert sorted(outs) == ["refused", "refused", "refused", "won"], outs


def test_a_damaged_later_checkpoint_is_refused_not_skipped(tmp_path, good_run):
    run, found = copy_run(good_run, tmp_path)
    (found / INDEX).unlink()  # step 2 (the latest) lost its index; step 1 is whole
    with pytest.raises(
        CheckpointError, match=r"step_00000002 is not a whole checkpoint \(index.json missing\); move it out"
    ):
        train(cfg("trainer.steps=3", "resume=auto"), run)
    for p in (run / "checkpoints").iterdir():
        (p / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="is not a whole checkpoint"):
        train(cfg("trainer.steps=3", "resume=auto"), run)
    with pytest.raises(ConfigError, match="already holds checkpoints"):  # nor does a fresh run write over them
        train(cfg("trainer.steps=3"), run)


def test_a_json_file_swapped_in_from_another_checkpoint_is_refused(tmp_path, good_run):
    run, found = copy_run(good_run, tmp_path)
    shutil.copy(run / "checkpoints" / "step_00000001" / "state.json", found / "state.json")
    with pytest.raises(CheckpointError, match="state.json does not match its digest in index.json"):
        train(cfg("trainer.steps=3", "resume=auto"), run)


def test_allow_config_change_applies_a_new_weight_decay(tmp_path):
    run = tmp_path / "run"
    train(cfg("trainer.steps=1", "trainer.ckpt_every=1", "optim.weight_decay=0"), run)
    train(
        cfg(
            "trainer.steps=2",
            "trainer.ckpt_every=1",
            "resume=auto",
            "optim.weight_decay=0.1",
            "trainer.allow_config_change=true",
        ),
        run,
    )
    leaves = json.loads((run / "checkpoints" / "step_00000002" / "state.json").read_text())["leaves"]
    decays = sorted({v for k, v in leaves if k[-1] == "weight_decay"})
    assert decays == [0.0, 0.1], decays  # the matrix groups decay with the new value, vectors not at all


def test_a_conversion_never_writes_into_its_source(tmp_path, good_run):
    from moeflow.launch import convert

    run, _ = copy_run(good_run, tmp_path)
    with pytest.raises(CheckpointError, match="is the run being converted"):
        convert.main(["moeflow-to-safetensors", str(run), str(run)])


def test_a_damaged_shard_is_one_line_in_the_tools_too(tmp_path, good_run):
    from moeflow.launch import convert
    from moeflow.launch.inference import load_model

    run, found = copy_run(good_run, tmp_path)
    shard = found / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-50] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its digest"):
        load_model(str(run))
    with pytest.raises(CheckpointError, match="does not match its digest"):
        convert.main(["moeflow-to-safetensors", str(run), str(tmp_path / "out")])


def test_every_conversion_refuses_an_existing_output_without_force(tmp_path, good_run):
    from moeflow.launch import convert

    run, _ = copy_run(good_run, tmp_path)
    out = tmp_path / "st"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="already exists; choose a new output folder or pass --force"):
        convert.main(["moeflow-to-safetensors", str(run), str(out)])
    assert (out / "mine.txt").read_text() == "keep me"
    convert.main(["moeflow-to-safetensors", str(run), str(out), "--force"])
    assert not (out / "mine.txt").exists() and (out / "checkpoints").is_dir()
    assert not list(tmp_path.glob(".tmp-st-*"))  # the temp folder it wrote through is gone
