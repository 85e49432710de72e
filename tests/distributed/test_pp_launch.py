"""Pipeline parallelism from the command line: torchrun parallel.pp=2 follows the single-process run, its
checkpoints resume at pp=1, pp=4 and pp=2 x ep=2 (interleaved) where the uninterrupted run goes, its
exports equal the single-process run's, generate reads it, and what pipelining cannot run is one line.

The balance loss is off here (gate.aux_loss_coef=0): a pipeline's micro-batches each have their own
routing statistics (as gradient accumulation's do), so only then is pp=2 the same computation as one
process on the whole batch. With the loss on, `test_pipeline.py` compares against a reference that
runs the same micro-batches."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from helpers.cli_runs import SMALL, moeflow_warnings, train_cmd
from helpers.cli_runs import run_cmd as _run
from helpers.config import assert_refused_in_one_line

pytestmark = pytest.mark.multiprocess

RUN = [
    "trainer.log_every=1",
    "trainer.eval_every=2",
    "trainer.ckpt_every=2",
    "trainer.keep_checkpoints=0",
    "gate.aux_loss_coef=0",
]
BATCH4 = [s for s in SMALL if not s.startswith("data.batch_size")] + ["data.batch_size=4"]


def _train(tmp_path, run_dir, *overrides: str, nproc: int = 1, batch=BATCH4):
    return _run(train_cmd(*RUN, *batch, f"hydra.run.dir={run_dir}", *overrides, nproc=nproc), tmp_path)


def _losses(run_dir) -> dict[int, float]:
    log = (run_dir / "train.log").read_text()
    found = re.findall(r"step (\d+)/\d+, loss ([0-9.]+)", log)
    val = re.findall(r"step (\d+): train loss [0-9.]+, val loss ([0-9.]+)", log)
    return {int(s): float(v) for s, v in found} | {-int(s): float(v) for s, v in val}  # val losses at -step


def _same(a: dict, b: dict) -> bool:
    return set(b) <= set(a) and all(abs(a[s] - b[s]) <= 2e-4 for s in b)  # printed to 4 decimals


def test_pp2_follows_one_process_and_checkpoints_reshard_across_pipeline_degrees(tmp_path):
    one = tmp_path / "one"
    _train(tmp_path, one, "trainer.steps=5")
    pp2 = tmp_path / "pp2"
    proc = _train(tmp_path, pp2, "trainer.steps=4", "parallel.pp=2", nproc=2)
    assert not moeflow_warnings(proc.stderr), moeflow_warnings(proc.stderr)
    log = (pp2 / "train.log").read_text()
    assert "pipeline: 2 stages, schedule 1f1b, 2 micro-batches per step, predicted bubble 33.3%" in log, log[-3000:]
    assert re.search(r"stage 0: blocks 0-1 \+ embedding, [0-9.]+M params; stage 1: blocks 2-3 \+ head", log)
    assert re.search(r"step 4: stage forward ms per micro-batch: 0: [0-9.]+, 1: [0-9.]+", log)
    a, b = _losses(one), _losses(pp2)
    assert set(b) == {1, 2, 3, 4, -2, -4} and _same(a, b), (a, b)
    # pp=4 (one block per stage) resumes pp=2's step 2
    pp4 = tmp_path / "pp4"
    _train(
        tmp_path,
        pp4,
        "trainer.steps=5",
        "parallel.pp=4",
        "trainer.activation_checkpointing=full",  # each stage's block recomputed in its backward
        f"resume={pp2 / 'checkpoints' / 'step_00000002'}",
        nproc=4,
    )
    assert _same(a, _losses(pp4)) and 5 in _losses(pp4), (a, _losses(pp4))
    # pp=2 x ep=2 (interleaved, 2 data-parallel ranks of 2 sequences: the same global batch) resumes step 4
    ep = tmp_path / "pp2ep2"
    _train(
        tmp_path,
        ep,
        "trainer.steps=5",
        "parallel.pp=2",
        "parallel.ep=2",
        "parallel.pp_schedule=interleaved_1f1b",
        "parallel.pp_microbatches=2",
        f"resume={pp2 / 'checkpoints' / 'step_00000004'}",
        nproc=4,
        batch=SMALL,
    )
    assert _same(a, _losses(ep)) and set(_losses(ep)) == {5, -5}, (a, _losses(ep))
    # and one process resumes the pipelined step 4
    back = tmp_path / "back"
    _train(tmp_path, back, "trainer.steps=5", f"resume={pp2 / 'checkpoints' / 'step_00000004'}")
    assert _same(a, _losses(back)) and 5 in _losses(back)

    # exports of the pipelined checkpoint equal the single-process run's
    def convert(*args):
        cmd = [sys.executable, "-m", "moeflow.launch.cli", "convert", *map(str, args)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]

    from safetensors.torch import load_file

    for name, run in (("one", one), ("pp2", pp2)):
        convert("moeflow-to-safetensors", run / "checkpoints" / "step_00000004", tmp_path / f"st_{name}")
    tensors = [
        {k: v for f in sorted((tmp_path / f"st_{n}").rglob("*.safetensors")) for k, v in load_file(f).items()}
        for n in ("one", "pp2")
    ]
    assert tensors[0].keys() == tensors[1].keys() and len(tensors[0]) > 10
    assert max((tensors[0][k].float() - tensors[1][k].float()).abs().max().item() for k in tensors[0]) < 1e-4
    # generate reads the pipelined run in one process
    gen = subprocess.run(
        [sys.executable, "-m", "moeflow.launch.cli", "generate", str(pp2), "--prompt", "def ", "--max-new-tokens", "4"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert gen.returncode == 0 and gen.stdout.startswith("def "), gen.stderr[-2000:]
    meta = json.loads((pp2 / "checkpoints" / "step_00000004" / "index.json").read_text())
    assert {t.split(".")[2] for t in meta["tensors"] if t.startswith("model.blocks.")} == {"0", "1", "2", "3"}


def test_pipeline_refuses_what_it_cannot_run_in_one_line():
    cases = [
        (["parallel.pp=3"], "parallel.pp=3 x parallel.dp_replicate=1 x parallel.tp=1 does not divide the world size 2"),
        (["parallel.pp=2", "engine=deepspeed"], "engine=deepspeed has no pipeline parallelism here"),
        (["parallel.pp=2", "parallel.pp_schedule=zbv"], "use parallel.pp_schedule=1f1b or interleaved_1f1b"),
        (["parallel.pp=2", "parallel.pp_schedule=interleaved_zb"], "zero-bubble schedules"),
        (["parallel.pp=2", "gate=hash"], "gate=hash with parallel.pp=2"),
        (["parallel.pp=2", "model.tie_embeddings=true"], "model.tie_embeddings=true with parallel.pp=2"),
        (["parallel.pp=2", "parallel.cp=2"], "parallel.pp=2 x parallel.dp_replicate=1 x parallel.cp=2 x parallel.tp=1"),
        (["parallel.pp=2", "model.n_layers=1"], "2 pipeline stages for 1 blocks"),
        (["parallel.pp=2", "parallel.pp_layers_per_stage=[3,3]"], "does not split 4 blocks into 2 stages"),
        (["parallel.pp=2", "data.batch_size=3"], "parallel.pp_microbatches=2 does not divide data.batch_size=3"),
        (["parallel.pp=2", "parallel.pp_microbatches=1"], "needs at least as many micro-batches as stages (2)"),
    ]
    assert_refused_in_one_line(cases)
