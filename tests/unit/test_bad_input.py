"""Bad input fails before training, with one line that names the problem and the fix."""

import os
import subprocess
import sys

import pytest

from helpers.config import TINY, compose_cfg
from helpers.timeouts import limit
from moeflow.launch import cli
from moeflow.launch.train import train
from moeflow.moe.errors import CheckpointError


def run_preflight(capsys, *args):
    """`moeflow train ARGS` in-process, for arguments that must fail in preflight (before any work)."""
    with pytest.raises(SystemExit) as e:
        cli.main(["train", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    assert err.startswith("moeflow train: error: ")
    return err


@pytest.mark.parametrize(
    "args,expect",
    [
        (["model.d_modle=64"], "unknown config key 'model.d_modle' (did you mean 'model.d_model'?)"),
        (["trainer.stpes=5"], "did you mean 'trainer.steps'?"),
        (["gate=nope"], "unknown choice 'nope' for gate; choose one of: "),
        (["model.top_k=9"], "model.top_k=9 is larger than model.num_experts=8; set top_k <= num_experts"),
        (["model.d_model=130"], "model.d_model=130 is not divisible by model.n_heads=4"),
        (["data=text"], "data.path is required here but was not set"),
        (["data=text", "data.path=/nonexistent/corpus"], "data.path=/nonexistent/corpus does not exist"),
        (["gate.capacity_factr=2"], "unknown config key 'gate.capacity_factr'"),
        (["experts.gather_rows=sometimes"], "experts.gather_rows='sometimes' is not valid: it takes true or false"),
        # values that once ended in a stack trace or, worse, a silent wrong run (exit 0)
        (["optim.lr=abc"], "optim.lr='abc' is not valid: it takes a number > 0"),
        (["optim.eps=-1"], "optim.eps=-1 is not valid"),
        (["optim.betas=[0.9]"], "optim.betas=[0.9] is not valid: it takes a list of 2 numbers"),
        (["data.batch_size=0"], "data.batch_size=0 is not valid: it takes an integer >= 1"),
        (["model.top_k=true"], "model.top_k must be a positive integer, got True"),
        (["parallel.backend=foo"], "parallel.backend='foo' is not valid: it takes one of auto, nccl, gloo"),
        (["data.seq_len=0"], "data.seq_len=0 is not valid"),
        (["trainer.ckpt_every=-1"], "a negative value would silently never checkpoint"),
        (["data.val_percent=100"], "data.val_percent=100 is not valid: it takes a number > 0 and < 100"),
        (["resume=auto"], "resume=auto continues the run in hydra.run.dir, but none was given"),
        (["launcher=local", "launcher.nproc=2", "parallel.ep=4"], "parallel.ep=4 does not divide dp_shard x tp = 2"),
        # found by a new user's trial: tracebacks, a silent one-process run, Hydra's lexer errors
        (["launcher=local", "launcher.nproc=auto"], "launcher.nproc='auto' is not valid: it takes an integer >= 1"),
        (["launcher=local", "launcher.nproc=1.5"], "launcher.nproc=1.5 is not valid"),
        (["launcher.nproc=2"], "'launcher.nproc' is a key of launcher=local, not of the default launcher=none"),
        (["+launcher.nproc=2"], "launcher.nproc is not read by launcher=none; choose launcher=local"),
        (
            ["launcher=slurm", "launcher.nproc=2"],
            "'launcher.nproc' is not a key of launcher=slurm (only of launcher=local)",
        ),
        (
            ["--steps", "2"],
            "--steps is not an option of moeflow train: its settings are key=value overrides; use trainer.steps=N",
        ),
        (["--device", "cpu"], "use trainer.device=cpu|cuda"),
        (
            ["trainer.device=cuda:0"] if not __import__("torch").cuda.is_available() else ["trainer.precision=fp8"],
            "trainer.",
        ),
    ],
)
def test_config_errors_are_one_line(capsys, args, expect):
    assert expect in run_preflight(capsys, *args)


def test_a_sweep_job_refuses_a_launcher_key_its_launcher_does_not_read(tmp_path):
    """`moeflow train -m ... +launcher.nproc=2` runs each job in-process, without the preflight: the job's own
    checks refuse the key (before, every job ran on one process, silently)."""
    from moeflow.moe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"launcher.nproc is not read by launcher=none; choose launcher=local"):
        train(compose_cfg(*TINY, "+launcher.nproc=2", "trainer.steps=1"), tmp_path / "a")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_empty_data_file(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "is empty" in run_preflight(capsys, "data=text", f"data.path={empty}")


def test_unwritable_output_dir(capsys, tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "a_file"  # root can write anywhere: use a path under a regular file instead
        blocker.write_text("x")
        err = run_preflight(capsys, f"hydra.run.dir={blocker}/run")
        assert "cannot be created" in err
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert "not writable" in run_preflight(capsys, f"hydra.run.dir={locked}/run")


def test_resume_from_a_different_model_shape(tmp_path):
    train(compose_cfg(*TINY, "trainer.steps=1", "trainer.eval_every=0", "trainer.ckpt_every=1"), tmp_path / "a")
    with pytest.raises(
        CheckpointError, match=r"different model shape \(d_model: checkpoint 32 vs run 48.*start a fresh run"
    ):
        train(compose_cfg(*TINY, "model.d_model=48", "trainer.steps=2", f"resume={tmp_path / 'a'}"), tmp_path / "b")


@pytest.mark.parametrize(
    "damage, match",
    [
        ("data", "is damaged: shard_00000.safetensors has 100 bytes.*resume from another checkpoint"),
        ("metadata", "index.json is unreadable.*resume from another checkpoint"),
    ],
)
def test_corrupt_checkpoint(tmp_path, damage, match):
    train(compose_cfg(*TINY, "trainer.steps=1", "trainer.eval_every=0", "trainer.ckpt_every=1"), tmp_path / "a")
    ckpt_dir = next((tmp_path / "a" / "checkpoints").iterdir())
    target = next(ckpt_dir.glob("shard_*.safetensors")) if damage == "data" else ckpt_dir / "index.json"
    target.write_bytes(target.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=match):
        train(compose_cfg(*TINY, "trainer.steps=2", f"resume={tmp_path / 'a'}"), tmp_path / "b")


def test_cli_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "moeflow.launch.cli", "train", "model.top_k=99"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=limit(120),
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "moeflow train: error: model.top_k=99 is larger than model.num_experts=8; set top_k <= num_experts"
    )
    assert not (tmp_path / "outputs").exists()  # nothing started


BLOCK_TORCH = """
import sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch imported before the command line was checked")
sys.meta_path.insert(0, NoTorch())
from moeflow.launch.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize(
    "args, expect",
    [(["model.d_modle=64"], "did you mean 'model.d_model'?"), (["gate=nope"], "unknown choice 'nope' for gate")],
)
def test_a_typo_is_reported_before_torch_is_imported(tmp_path, args, expect):
    """The fast answer (about half a second, instead of the seconds torch takes to import): the
    command line is composed and checked by Hydra alone, with torch made unimportable here."""
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, "train", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=limit(60),
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("moeflow train: error: ") and expect in proc.stderr and proc.stderr.count("\n") == 1


def test_version_and_train_help(tmp_path):
    version = subprocess.run(
        [sys.executable, "-m", "moeflow.launch.cli", "--version"], capture_output=True, text=True, timeout=limit(60)
    )
    assert version.returncode == 0 and version.stdout.startswith("moeflow 0.")
    helped = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, "train", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=limit(60),
    )
    assert helped.returncode == 0, helped.stderr
    for group in (
        "model",
        "gate",
        "data",
        "optim",
        "parallel",
        "engine",
        "launcher",
    ):  # every group, one line per choice
        assert f"\n  {group}\n" in helped.stdout
    assert "*topk" in helped.stdout and "sinkhorn" in helped.stdout and "docs/configs.md" in helped.stdout


def test_token_files_are_checked_against_their_metadata_and_text_is_refused(tmp_path, capsys):
    import json

    import numpy as np

    tokens = tmp_path / "prepared" / "train.bin"
    tokens.parent.mkdir()
    np.arange(1000, dtype=np.uint32).tofile(tokens)
    (tokens.parent / "meta.json").write_text(json.dumps({"dtype": "uint32", "vocab_size": 1000}))
    err = run_preflight(capsys, "data=memmap", f"data.path={tokens}", "data.dtype=uint16", "model.vocab_size=1000")
    assert "holds uint32 tokens" in err and "set data.dtype=uint32" in err  # once read as uint16: garbage, silently
    text = tmp_path / "notes.txt"
    text.write_text("plain prose, not token ids\n" * 50)
    assert "looks like text, not a token file" in run_preflight(capsys, "data=memmap", f"data.path={text}")
    odd = tmp_path / "odd.bin"
    odd.write_bytes(bytes([1, 200, 3, 250, 5]) * 101)
    assert "not a whole number of uint16 tokens" in run_preflight(capsys, "data=memmap", f"data.path={odd}")


def test_the_launcher_world_counts_before_torchrun_sets_it():
    """launcher=local launcher.nproc=2 parallel.ep=2 was refused: the check read WORLD_SIZE (1) of the launching shell."""
    from moeflow.launch.config import validate

    validate(compose_cfg("launcher=local", "launcher.nproc=2", "parallel.ep=2"))


@pytest.mark.parametrize(
    "override, hint", [("seed=7", "did you mean 'trainer.seed'?"), ("foo=1", "unknown config key 'foo'")]
)
def test_an_unknown_top_level_key_is_one_line(capsys, override, hint):
    """A key without a dot once reached Hydra's 81-line ConfigCompositionException (it was taken for a group)."""
    assert hint in run_preflight(capsys, override)


@pytest.mark.parametrize("world, global_batch, per", [("1", 10, 4), ("2", 12, 8)])
def test_a_global_batch_the_launch_cannot_meet_is_refused_before_the_run_dir(
    capsys, tmp_path, monkeypatch, world, global_batch, per
):
    """It was refused only once the process group had started: logged and printed (twice), with a run
    dir holding nothing but its train.log. The launch's ranks come from torchrun's WORLD_SIZE (12 is
    3 micro-batches of 4 on one rank, but not whole ones of 4 x 2 ranks), or before launching, from the
    launcher's process count."""
    monkeypatch.setenv("WORLD_SIZE", world)
    run = tmp_path / "run"
    args = ["data.batch_size=4", f"data.global_batch_size={global_batch}", f"hydra.run.dir={run}"]
    err = run_preflight(capsys, *args)
    monkeypatch.delenv("WORLD_SIZE")
    assert err == run_preflight(capsys, *args, "launcher=local", f"launcher.nproc={world}")
    assert (
        f"data.global_batch_size={global_batch} is not a multiple of data.batch_size=4 x {world} data-parallel ranks = {per}"
        in err
    )
    assert not run.exists()


def test_the_launched_processes_get_no_launcher_key_in_any_hydra_form(tmp_path):
    """`launcher=local ++launcher.nproc=4` passed the parent's preflight, then every rank (launcher=none)
    refused the key it was handed; `+launcher.vars.X` (the Slurm template's) likewise on the node."""
    from moeflow.launch.launchers.common import without_launcher
    from moeflow.launch.preflight import preflight

    args = ["launcher=local", "++launcher.nproc=1", "+launcher.vars.x=1", "~launcher.log_dir", "trainer.steps=1"]
    passed_on = without_launcher(args)
    assert passed_on == ["trainer.steps=1"]
    preflight([*passed_on, f"hydra.run.dir={tmp_path / 'run'}"])  # what a rank checks: no refusal


def test_a_ray_launch_keeps_its_launcher_overrides_in_every_hydra_form():
    """`+launcher.resources_per_worker.CPU=2` (a new key in the empty map needs the +) was dropped on the way
    to Ray Train: the workers got Ray's default resources, silently."""
    from moeflow.launch.launchers.common import compose
    from moeflow.launch.launchers.ray_train import ray_args

    args = ray_args(
        ["launcher=ray", "+launcher.resources_per_worker.CPU=2", "launcher.num_workers=3", "trainer.steps=1"]
    )
    cfg = compose(args)
    assert cfg.launcher.name == "ray" and cfg.launcher.num_workers == 3
    assert dict(cfg.launcher.resources_per_worker) == {"CPU": 2}
    assert cfg.trainer.steps == 1
