"""The trainer end to end on tiny shapes: loss falls, checkpoints, bit-identical resume."""

import json
import shutil

import pytest
import torch

from helpers.config import TINY, compose_cfg
from moeflow.launch import checkpoint as ckpt
from moeflow.launch.train import train
from moeflow.parallel.checkpoint import read_full_tensors


def test_training_lowers_validation_loss_and_writes_run_dir(tmp_path):
    cfg = compose_cfg(*TINY, "trainer.steps=30", "trainer.eval_every=30", "trainer.ckpt_every=15")
    result = train(cfg, tmp_path)
    assert result["step"] == 30 and result["val_loss"] < 5.0  # starts near ln(256) = 5.55
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_00000015", "step_00000030"]
    assert any((tmp_path / "tensorboard").iterdir())
    assert (tmp_path / "routing_stats.jsonl").read_text().count('"layer": 1') == 15


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_losses_are_read_as_bits_per_byte_for_bytes_and_perplexity_for_tokens(tmp_path):
    import math

    import numpy as np

    train(compose_cfg(*TINY, "trainer.steps=2", "trainer.eval_every=2", "trainer.ckpt_every=0"), tmp_path / "bytes")
    loss, bits = _scalars(tmp_path / "bytes", "val/loss"), _scalars(tmp_path / "bytes", "val/bits_per_byte")
    assert loss.keys() == bits.keys() == {0, 2}
    assert all(abs(bits[s] - loss[s] / math.log(2)) < 1e-5 for s in loss)
    tokens = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 200, 20000).astype(np.uint16).tofile(tokens)
    train(
        compose_cfg(
            *[a for a in TINY if not a.startswith("data.max_bytes")],
            "data=memmap",
            f"data.path={tokens}",
            "data.seq_len=32",
            "data.batch_size=4",
            "trainer.steps=2",
            "trainer.eval_every=2",
            "trainer.ckpt_every=0",
        ),
        tmp_path / "tok",
    )
    loss, ppl = _scalars(tmp_path / "tok", "val/loss"), _scalars(tmp_path / "tok", "val/perplexity")
    assert loss.keys() == ppl.keys() and all(abs(ppl[s] - math.exp(loss[s])) < 1e-3 * ppl[s] for s in loss)


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    common = [
        *TINY,
        "trainer.steps=8",
        "trainer.eval_every=0",
        "trainer.ckpt_every=4",
        "trainer.keep_checkpoints=0",
        "trainer.grad_accum=2",
    ]
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    train(compose_cfg(*common), full)
    train(compose_cfg(*common), interrupted)
    # "kill" the second run after step 4: its last checkpoint is step 4
    shutil.rmtree(interrupted / "checkpoints" / "step_00000008")
    result = train(compose_cfg(*common, "resume=auto"), interrupted)
    assert result["start_step"] == 4
    # weights and AdamW moments (every tensor of the sharded checkpoint), bit for bit
    a = read_full_tensors(full / "checkpoints" / "step_00000008")
    b = read_full_tensors(interrupted / "checkpoints" / "step_00000008")
    assert a.keys() == b.keys() and any(k.startswith("optim.state.") and k.endswith("exp_avg_sq") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_half_written_checkpoint_is_never_picked_up(tmp_path):
    cfg = compose_cfg(*TINY, "trainer.steps=2", "trainer.eval_every=0", "trainer.ckpt_every=2")
    train(cfg, tmp_path)
    root = tmp_path / "checkpoints"
    # a crash while writing leaves only a temp dir; resume must ignore it
    (root / ".tmp-step_00000004-123").mkdir()
    (root / ".tmp-step_00000004-123" / "model.safetensors").write_bytes(b"garbage")
    assert ckpt.find_checkpoint(tmp_path).name == "step_00000002"


def test_every_scalar_routing_statistic_reaches_tensorboard(tmp_path):
    """Per-layer balance, entropy and aux losses: once written only inside the capacity dispatcher's
    drop-warning branch, so a default run logged none of them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(
        compose_cfg(*TINY, "trainer.steps=2", "trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.log_every=1"),
        tmp_path,
    )
    rows = [json.loads(line) for line in (tmp_path / "routing_stats.jsonl").read_text().splitlines()]
    scalar_keys = {
        (r["layer"], k) for r in rows for k, v in r.items() if k not in ("step", "layer") and not isinstance(v, list)
    }
    assert len(scalar_keys) >= 4, scalar_keys  # e.g. load_max_over_mean, router entropy, aux loss, per layer
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    logged = set(acc.Tags()["scalars"])
    missing = sorted(f"moe/layer{layer}/{k}" for layer, k in scalar_keys if f"moe/layer{layer}/{k}" not in logged)
    assert not missing, missing


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_continue(tmp_path):
    """SIGINT outside Slurm: a checkpoint at the next step boundary, one line on stderr, exit 130;
    the run then continues from it with resume=auto."""
    import signal
    import subprocess
    import sys
    import time

    from helpers.timeouts import limit

    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "moeflow.launch.cli",
        "train",
        *TINY,
        "trainer.steps=100000",
        "trainer.eval_every=0",
        "trainer.ckpt_every=0",
        "trainer.log_every=1",
        f"hydra.run.dir={run}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + limit(60)
    while not (run / "routing_stats.jsonl").exists() or not (run / "routing_stats.jsonl").read_text():
        assert time.monotonic() < deadline and proc.poll() is None, (
            proc.stderr.read()[-2000:] if proc.poll() is not None else "no step"
        )
        time.sleep(0.1)  # training has begun
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=limit(60))
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("moeflow train: error: stopped by SIGINT after step") and "resume=auto" in last, last
    saved = ckpt.find_checkpoint(run)
    assert saved is not None
    step = int(saved.name.removeprefix("step_"))
    done = train(compose_cfg(*TINY, f"trainer.steps={step + 1}", "trainer.eval_every=0", "resume=auto"), run)
    assert done["start_step"] == step


def test_a_line_per_log_step_in_the_run_log(tmp_path, caplog):
    """step, loss, lr, grad norm, tokens/s and the per-layer balance, once per log step (no TTY, no bar)."""
    import logging

    with caplog.at_level(logging.INFO, logger="moeflow.train"):
        train(
            compose_cfg(
                *TINY, "trainer.steps=4", "trainer.log_every=2", "trainer.eval_every=0", "trainer.ckpt_every=0"
            ),
            tmp_path,
        )
    lines = [r.message for r in caplog.records if r.message.startswith("step ") and "tok/s" in r.message]
    assert [ln.split(",")[0] for ln in lines] == ["step 2/4", "step 4/4"], lines
    assert all(
        "loss " in ln and "lr " in ln and "grad norm " in ln and "load max/mean" in ln and "over 2 layers" in ln
        for ln in lines
    ), lines


def test_a_global_batch_size_derives_the_accumulation(tmp_path):
    """data.global_batch_size=8 with 4 per micro-batch on one process trains exactly as grad_accum=2."""
    from moeflow.moe.errors import ConfigError

    common = [
        *TINY,
        "trainer.steps=3",
        "trainer.eval_every=0",
        "trainer.ckpt_every=0",
        "trainer.log_every=1",
        "data.batch_size=4",
    ]
    a = train(compose_cfg(*common, "data.global_batch_size=8"), tmp_path / "a")
    b = train(compose_cfg(*common, "trainer.grad_accum=2"), tmp_path / "b")
    assert a["train_loss"] == b["train_loss"]
    with pytest.raises(ConfigError, match="data.global_batch_size=10 is not a multiple of data.batch_size=4"):
        train(compose_cfg(*common, "data.global_batch_size=10"), tmp_path / "c")
