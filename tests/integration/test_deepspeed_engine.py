"""engine=deepspeed: the same training as the torch engine, through DeepSpeed (CPU accelerator, gloo).

A 2-process run with ZeRO-1, ZeRO-2, ZeRO-3 and ZeRO-2 + CPU optimizer offload (grad
accumulation 2, clipping on) must match the plain torch trainer's (DDP) per-step losses and
final weights; a ZeRO-2 run resumed from
its step-2 DeepSpeed checkpoint must equal the uninterrupted run; the DeepSpeed checkpoint
converts to a moeflow checkpoint that the torch engine resumes from. With expert parallelism
(parallel.ep=2: two experts per rank, all-to-all) ZeRO-1, ZeRO-2 and ZeRO-2 + offload must
match the single-process torch trainer on the same global batch (validation loss after every
step, final weights of all experts after conversion), and resume exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.session_cache import once
from helpers.timeouts import limit
from moeflow.moe.errors import ConfigError

deepspeed = pytest.importorskip("deepspeed", reason="pip install moeflow[deepspeed]")

TINY = [
    "model.n_layers=2",
    "model.d_model=64",
    "model.n_heads=4",
    "model.d_ff=64",
    "model.num_experts=4",
    "data.max_bytes=200000",
    "data.batch_size=4",
    "data.seq_len=32",
    "trainer.grad_accum=2",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.progress=false",
    "optim.warmup_steps=2",
    "optim.lr=1e-2",
]
STEPS = 4
# Loss tolerance: ZeRO reduces gradients with reduce-scatter in a different order than DDP's
# bucketed all-reduce, so fp32 sums differ in the last bits; after 4 AdamW steps the
# losses agree to 1e-5 relative (observed <= 2.1e-7, ZeRO-3).
RTOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Expert parallelism: evaluate after every step (validation draws global batches, each rank its
# slice, so the EP model and the single-process model see identical inputs).
EP_TINY = [o for o in TINY if not o.startswith("trainer.eval_every")] + [
    "trainer.eval_every=1",
    "trainer.eval_batches=2",
]


def torchrun(run_dir: Path, *overrides: str, nproc: int = 2, base: list[str] = TINY) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--master-port",
        str(free_port()),
        "-m",
        "moeflow.launch.cli",
        "train",
        *base,
        f"trainer.steps={STEPS}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit(240), env=env, cwd=run_dir.parent)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def losses(run_dir: Path, tag: str = "train/loss") -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def single_process_run(run_dir: Path, *overrides: str, world: int = 2) -> None:
    """The plain trainer (engine=torch, one process) on the global batch of `world` ranks: its
    micro-batch (and validation batch) is every rank's stacked, so its mean loss is the mean over ranks."""
    from moeflow.launch import train as trainer

    real = trainer.training_samplers

    class GlobalBatch:
        def __init__(self, per_rank):
            self.per_rank = per_rank

        def batch(self, step, micro, rank=0, ranks=1, attempt=0):
            xs, ys = zip(*(self.per_rank.batch(step, micro, r, world, attempt) for r in range(world)))
            return torch.cat(xs), torch.cat(ys)

    def samplers(*args):
        splits, train, val = real(*args)
        return splits, GlobalBatch(train), GlobalBatch(val)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "training_samplers", samplers)
        trainer.train(compose(*EP_TINY, f"trainer.steps={STEPS}", *overrides), run_dir)


def weights(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """Model weights of a checkpoint: engine=torch's sharded (DCP) or a single safetensors file."""
    from safetensors.torch import load_file

    from moeflow.parallel.checkpoint import read_full_tensors

    if (ckpt_dir / "model.safetensors").exists():
        return load_file(str(ckpt_dir / "model.safetensors"))
    return read_full_tensors(ckpt_dir, prefix="model.")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, worker_id):
    """Nine short trainings every comparison below reads: computed once per session (the tests
    that use them share one xdist group, and the result is cached for any other worker)."""
    return once(tmp_path_factory, worker_id, "deepspeed_runs", _train_all)


def _train_all(root):
    out = {}
    torchrun(root / "torch", "trainer.ckpt_every=4")
    out["torch"] = root / "torch"
    for stage in (1, 2):
        torchrun(root / f"zero{stage}", "engine=deepspeed", f"engine.zero_stage={stage}", "trainer.ckpt_every=2")
        out[f"zero{stage}"] = root / f"zero{stage}"
    torchrun(root / "zero3", "engine=deepspeed", "engine.zero_stage=3", "trainer.ckpt_every=4")
    out["zero3"] = root / "zero3"
    torchrun(
        root / "zero2_offload",
        "engine=deepspeed",
        "engine.zero_stage=2",
        "engine.offload_optimizer=true",
        "trainer.ckpt_every=4",
    )
    out["zero2_offload"] = root / "zero2_offload"
    single_process_run(root / "single", "trainer.ckpt_every=4")
    out["single"] = root / "single"
    for name, zero in [
        ("ep2_zero1", ["engine.zero_stage=1"]),
        ("ep2_zero2", ["engine.zero_stage=2"]),
        ("ep2_zero2_offload", ["engine.zero_stage=2", "engine.offload_optimizer=true"]),
    ]:
        torchrun(root / name, "engine=deepspeed", *zero, "parallel.ep=2", "trainer.ckpt_every=2", base=EP_TINY)
        out[name] = root / name
    return out


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("run", ["zero1", "zero2", "zero3", "zero2_offload"])
@pytest.mark.xdist_group("deepspeed_runs")
def test_zero_matches_torch_trainer(runs, run, tmp_path):
    """ZeRO-3 (parameters partitioned too) and CPU optimizer offload follow the same trajectory."""
    from moeflow.launch.engines.deepspeed_engine import convert_to_moeflow

    ref, got = losses(runs["torch"]), losses(runs[run])
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    assert ref[STEPS] < ref[1]  # it trains
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=RTOL), (step, ref, got)
    # the DeepSpeed checkpoint, consolidated, holds the torch trainer's weights
    converted = convert_to_moeflow(runs[run], tmp_path / "converted", trust=True)
    w_ref, w_got = weights(runs["torch"] / "checkpoints" / f"step_{STEPS:08d}"), weights(converted)
    assert sorted(w_ref) == sorted(w_got)
    for k in w_ref:
        torch.testing.assert_close(
            w_got[k], w_ref[k], rtol=0, atol=1e-4, msg=k
        )  # 1% of one AdamW step (lr 1e-2); observed <= 3.5e-5 (ZeRO-3)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.xdist_group("deepspeed_runs")
def test_resume_from_deepspeed_checkpoint(runs, tmp_path):
    from moeflow.launch.engines.deepspeed_engine import convert_to_moeflow

    full = runs["zero2"]
    resumed = tmp_path / "resumed"
    torchrun(
        resumed,
        "engine=deepspeed",
        "engine.zero_stage=2",
        "trainer.ckpt_every=2",
        "engine.trust_checkpoint=true",
        f"resume={full / 'checkpoints' / 'deepspeed' / 'step_00000002'}",
    )
    a, b = losses(full), losses(resumed)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], rel=1e-6), (a, b)
    w_full = weights(convert_to_moeflow(full, tmp_path / "c_full", trust=True))
    w_res = weights(convert_to_moeflow(resumed, tmp_path / "c_res", trust=True))
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], rtol=1e-6, atol=1e-7, msg=k)
    meta = json.loads((tmp_path / "c_full" / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["converted_from"]["format"] == "deepspeed"


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.xdist_group("deepspeed_runs")
def test_converted_checkpoint_resumes_with_torch_engine(runs, tmp_path):
    """DeepSpeed step-2 checkpoint -> moeflow checkpoint -> engine=torch continues the schedule."""
    from moeflow.launch.engines.deepspeed_engine import convert_to_moeflow

    conv = convert_to_moeflow(
        runs["zero1"] / "checkpoints" / "deepspeed" / "step_00000002", tmp_path / "conv", trust=True
    )
    assert conv.name == "step_00000002"
    cont = tmp_path / "cont"
    torchrun(cont, f"resume={conv}", "trainer.ckpt_every=0", nproc=2)  # the same global batch: the same step-3 loss
    got = losses(cont)
    assert sorted(got) == [3, 4]
    # step 3's loss is computed with the step-2 weights before any update: exactly the DeepSpeed run's
    assert got[3] == pytest.approx(losses(runs["zero1"])[3], rel=RTOL)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("run", ["ep2_zero1", "ep2_zero2", "ep2_zero2_offload"])
@pytest.mark.xdist_group("deepspeed_runs")
def test_expert_parallel_matches_single_process_trainer(runs, run, tmp_path):
    """EP=2: moeflow's expert shards + all-to-all, DeepSpeed reducing and ZeRO-partitioning the expert
    groups over the expert-data-parallel group, train exactly the single-process model."""
    from moeflow.launch.engines.deepspeed_engine import convert_to_moeflow

    ref, got = losses(runs["single"], "val/loss"), losses(runs[run], "val/loss")
    assert sorted(ref) == sorted(got) == list(range(STEPS + 1))
    assert ref[STEPS] < ref[1] < ref[0]  # it trains
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=RTOL), (step, ref, got)
    # consolidated from ZeRO partitions that differ per EP rank: the full model, every expert
    w_ref, w_got = (
        weights(runs["single"] / "checkpoints" / f"step_{STEPS:08d}"),
        weights(convert_to_moeflow(runs[run], tmp_path / "converted", trust=True)),
    )
    assert sorted(w_ref) == sorted(w_got)
    assert w_got["blocks.0.ffn.experts.w1_EDF"].shape[0] == 4
    for k in w_ref:
        torch.testing.assert_close(
            w_got[k], w_ref[k], rtol=0, atol=1e-4, msg=k
        )  # observed <= 1.6e-5 (val losses: equal)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.xdist_group("deepspeed_runs")
def test_resume_expert_parallel_deepspeed_checkpoint(runs, tmp_path):
    """Every EP rank gets its own experts back (not rank 0's module file); another EP size is refused."""
    from moeflow.launch.engines.deepspeed_engine import convert_to_moeflow

    full, step2 = runs["ep2_zero2"], runs["ep2_zero2"] / "checkpoints" / "deepspeed" / "step_00000002"
    resumed = tmp_path / "resumed"
    torchrun(
        resumed,
        "engine=deepspeed",
        "engine.zero_stage=2",
        "parallel.ep=2",
        "trainer.ckpt_every=2",
        "engine.trust_checkpoint=true",
        f"resume={step2}",
        base=EP_TINY,
    )
    for tag in ("train/loss", "val/loss"):
        a, b = losses(full, tag), losses(resumed, tag)
        assert sorted(b) == [3, 4]
        for step in (3, 4):
            assert b[step] == pytest.approx(a[step], rel=1e-6), (tag, a, b)
    w_full, w_res = (
        weights(convert_to_moeflow(full, tmp_path / "c_full", trust=True)),
        weights(convert_to_moeflow(resumed, tmp_path / "c_res", trust=True)),
    )
    for k in w_full:
        torch.testing.assert_close(w_res[k], w_full[k], rtol=1e-6, atol=1e-7, msg=k)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeflow.launch.cli",
            "train",
            *EP_TINY,
            "engine=deepspeed",
            "engine.zero_stage=2",
            "engine.trust_checkpoint=true",
            f"resume={step2}",
            f"hydra.run.dir={tmp_path / 'ep1'}",
        ],
        capture_output=True,
        text=True,
        timeout=limit(240),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0, p.stderr
    assert "written with parallel.ep=2" in p.stderr and "resume with parallel.ep=2" in p.stderr


@pytest.mark.slow
def test_bf16_single_process(tmp_path):
    """bf16: DeepSpeed keeps bf16 weights (fp32 master copy in the optimizer) and still trains."""
    torchrun(
        tmp_path / "bf16",
        "engine=deepspeed",
        "engine.zero_stage=1",
        "trainer.precision=bf16",
        "trainer.ckpt_every=0",
        nproc=1,
    )
    got = losses(tmp_path / "bf16")
    assert all(v == v for v in got.values()) and got[STEPS] < got[1]
    assert '"param_dtype": "torch.bfloat16"' in (tmp_path / "bf16" / "train.log").read_text()


PREEMPTED_RUN = """
import json, os, signal, sys
from pathlib import Path
from hydra import compose, initialize_config_module
from moeflow.launch import run_hooks
from moeflow.launch.train import train

reported = []
def report(step, metrics, path):  # what the Ray Train worker registers; here it also "preempts" at step 2
    reported.append([step, str(path)])
    if step == 2:
        os.kill(os.getpid(), signal.SIGUSR1)  # what Slurm's --signal=B:USR1 delivers
run_hooks.set_checkpoint_reporter(report)
with initialize_config_module(config_module="moeflow.configs", version_base=None):
    cfg = compose(config_name="train", overrides=sys.argv[2:])
print("RESULT " + json.dumps({"result": train(cfg, Path(sys.argv[1])), "reported": reported}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("engine, ckpt_dir", [("torch", "checkpoints"), ("deepspeed", "checkpoints/deepspeed")])
def test_preemption_and_ray_hooks(engine, ckpt_dir, tmp_path):
    """Every engine runs the same loop: SIGUSR1 -> checkpoint + stop; checkpoints reported to Ray; resume=auto."""
    run_dir = tmp_path / "run"
    overrides = [
        *TINY,
        f"engine={engine}",
        f"trainer.steps={STEPS}",
        "trainer.ckpt_every=2",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "MOEFLOW_PREEMPTIBLE": "1", "OMP_NUM_THREADS": "1"}

    def run(*extra):
        p = subprocess.run(
            [sys.executable, "-c", PREEMPTED_RUN, str(run_dir), *overrides, *extra],
            capture_output=True,
            text=True,
            timeout=limit(240),
            env=env,
        )
        assert p.returncode == 0, p.stderr[-4000:]
        return json.loads(p.stdout.split("RESULT ")[-1]), p.stderr

    first, log = run()
    assert first["result"]["preempted"] and first["result"]["step"] == 2
    assert first["reported"] == [[2, str(run_dir / ckpt_dir / "step_00000002")]]  # the engine's own checkpoint dir
    assert "SIGUSR1 at step 2: checkpoint saved" in log
    assert (run_dir / ckpt_dir / "step_00000002" / "meta.json").exists()
    second, _ = run("resume=auto", *(["engine.trust_checkpoint=true"] if engine == "deepspeed" else []))
    assert (
        second["result"]["start_step"] == 2
        and second["result"]["step"] == STEPS
        and "preempted" not in second["result"]
    )
    assert second["reported"] == [[4, str(run_dir / ckpt_dir / "step_00000004")]]


@pytest.mark.slow
def test_resume_with_other_attention_shape_fails_in_one_line(tmp_path):
    """A Llama-family shape field (n_kv_heads) that differs from the DeepSpeed checkpoint's is refused before loading."""
    run_dir = tmp_path / "run"
    cli = [
        sys.executable,
        "-m",
        "moeflow.launch.cli",
        "train",
        *TINY,
        "engine=deepspeed",
        "trainer.steps=1",
        "trainer.ckpt_every=1",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert subprocess.run(cli, capture_output=True, text=True, timeout=limit(240), env=env).returncode == 0
    p = subprocess.run(
        [*cli, "model.n_kv_heads=2", "trainer.steps=2", "resume=auto"],
        capture_output=True,
        text=True,
        timeout=limit(240),
        env=env,
    )
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0, p.stderr
    assert (
        p.stderr.startswith("moeflow train: error: checkpoint ") and "n_kv_heads: checkpoint None vs run 2" in p.stderr
    )


def test_shape_keys_cover_the_llama_family_fields():
    from moeflow.launch.checkpoint import SHAPE_KEYS, model_shape_diffs

    assert {"n_kv_heads", "head_dim", "attn_bias", "qk_norm", "d_model", "num_experts"} <= set(SHAPE_KEYS)
    assert not {"top_k", "max_seq_len", "rope_theta", "gate", "experts_impl"} & set(SHAPE_KEYS)
    old = {"d_model": 64, "n_heads": 4}  # a config saved before the Llama-family fields existed: their defaults apply
    assert model_shape_diffs(old, {"d_model": 64, "n_heads": 4, "qk_norm": False}) == []
    assert model_shape_diffs(old, {"d_model": 64, "n_heads": 4, "qk_norm": True}) == [
        "qk_norm: checkpoint False vs run True"
    ]


# ---- config generation and bad input (no processes) ---------------------------------------


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="moeflow.configs", version_base=None):
        return hydra_compose(config_name="train", overrides=list(overrides))


def test_generated_config_follows_hydra_and_user_json(tmp_path):
    from moeflow.launch.engines.deepspeed_engine import deepspeed_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1000}, "steps_per_print": 5}))
    cfg = compose(
        "engine=deepspeed",
        "engine.zero_stage=2",
        "engine.offload_optimizer=true",
        "trainer.grad_accum=3",
        "data.batch_size=5",
        "optim.grad_clip=0.5",
        f"engine.config_file={user}",
    )
    c = deepspeed_config(cfg, use_bf16=True)
    assert c["train_micro_batch_size_per_gpu"] == 5 and c["gradient_accumulation_steps"] == 3
    assert c["gradient_clipping"] == 0.5 and c["bf16"] == {"enabled": True}
    z = c["zero_optimization"]
    assert z["stage"] == 2 and z["offload_optimizer"]["device"] == "cpu"
    assert z["reduce_bucket_size"] == 1000 and c["steps_per_print"] == 5  # user JSON wins, generated keys kept


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["engine.zero_stage=3", "parallel.ep=2"], ["zero_stage=3", "parallel.ep=2", "Stage 3"]),
        (["engine.zero_stage=0", "parallel.ep=2"], ["zero_stage=0", "not the global norm"]),
        (["engine.zero_stage=0", "engine.offload_optimizer=true"], ["needs ZeRO"]),
        (["engine.zero_stage=5"], ["not a ZeRO stage"]),
        (["engine.config_file=/nonexistent.json"], ["does not exist"]),
    ],
)
def test_conflicting_options_fail_clearly(overrides, words):
    from moeflow.launch.config import validate

    with pytest.raises(ConfigError) as e:
        validate(compose("engine=deepspeed", *overrides))
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize(
    "user, words",
    [
        ({"gradient_accumulation_steps": 4}, ["gradient_accumulation_steps=4", "trainer.grad_accum", "(here 1)"]),
        ({"zero_optimization": {"stage": 3}}, ["zero_optimization.stage=3", "engine.zero_stage"]),
        ({"train_micro_batch_size_per_gpu": 7}, ["train_micro_batch_size_per_gpu=7", "data.batch_size"]),
        ({"optimizer": {"type": "Adam"}}, ["optimizer=", "moeflow's AdamW"]),
    ],
)
def test_a_user_json_cannot_silently_override_what_moeflow_derives(tmp_path, user, words):
    """Before: gradient_accumulation_steps=4 made 6 logged steps one optimizer step, and ZeRO-3 set in the
    JSON slipped past the ZeRO-3 + EP refusal. Now each such key must agree, or it names the moeflow key."""
    from moeflow.launch.config import validate

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.raises(ConfigError) as e:
        validate(compose("engine=deepspeed", "engine.zero_stage=1", "parallel.ep=1", f"engine.config_file={path}"))
    assert all(w in str(e.value) for w in words), str(e.value)
    path.write_text(
        json.dumps({"gradient_accumulation_steps": 1, "zero_optimization": {"reduce_bucket_size": 1000}})
    )  # agreeing: fine
    validate(compose("engine=deepspeed", f"engine.config_file={path}"))


def test_missing_deepspeed_names_the_extra(monkeypatch):
    import importlib.util

    from moeflow.launch.config import validate

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install moeflow\[deepspeed\]"):
        validate(compose("engine=deepspeed"))


def test_cli_reports_conflict_in_one_line(tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeflow.launch.cli",
            "train",
            "engine=deepspeed",
            "engine.zero_stage=3",
            "parallel.ep=2",
            f"hydra.run.dir={tmp_path / 'r'}",
        ],
        capture_output=True,
        text=True,
        timeout=limit(120),
    )
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith(
        "moeflow train: error: engine.zero_stage=3 conflicts with parallel.ep=2"
    )


def test_expert_params_get_their_own_groups():
    from moeflow.launch.engines.deepspeed_engine import to_deepspeed_moe_groups
    from moeflow.launch.optim import optimizer_groups
    from moeflow.moe.model import ModelConfig, Transformer
    from moeflow.parallel.plan import is_expert

    model = Transformer(
        ModelConfig(d_model=32, n_heads=2, d_ff=32, n_layers=2, moe_every=2, shared_experts=1, num_experts=4)
    )
    names = [n for n, _ in model.named_parameters() if is_expert(n)]
    assert names and all(".experts." in n for n in names)  # routed experts only: not shared_expert, not the gate
    assert any("shared_expert" in n for n, _ in model.named_parameters())
    groups = optimizer_groups(model, weight_decay=0.1)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    expert_ids = ids(p for n, p in model.named_parameters() if n in names)
    assert set().union(*(ids(g["params"]) for g in groups if g["name"].startswith("experts"))) == expert_ids
    assert all(not (ids(g["params"]) & expert_ids) for g in groups if not g["name"].startswith("experts"))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    ds_groups = to_deepspeed_moe_groups(groups, 2)
    from deepspeed.moe.utils import is_moe_param, is_moe_param_group

    moe = [g for g in ds_groups if is_moe_param_group(g)]
    assert moe and all(
        g["name"] == "ep_size_2" and all(is_moe_param(p) and p.group_name == "ep_size_2" for p in g["params"])
        for g in moe
    )


def test_only_a_lock_whose_owner_is_gone_counts_as_stale(tmp_path):
    import time

    from moeflow.launch.engines.deepspeed_engine import STALE_AFTER_S, clear_stale_build_lock

    build = tmp_path / "op"
    build.mkdir()
    assert not clear_stale_build_lock(build)  # no lock at all
    (build / "lock").touch()
    assert not clear_stale_build_lock(build) and (build / "lock").exists()  # fresh: a live load holds it for a moment
    old = time.time() - 2 * STALE_AFTER_S
    os.utime(build / "lock", (old, old))
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=build)  # a build running there
    try:
        time.sleep(0.5)
        assert not clear_stale_build_lock(build) and (build / "lock").exists()
    finally:
        busy.kill()
        busy.wait()
    assert clear_stale_build_lock(build) and not (build / "lock").exists()


@pytest.mark.slow
def test_a_killed_builds_lock_does_not_hang_the_next_run(tmp_path):
    """A build killed mid-way leaves torch's `lock`; `moeflow prepare deepspeed-ops` (and every
    engine=deepspeed run, which builds through the same guard) clears it instead of waiting forever."""
    import time

    lock = tmp_path / "ext" / "deepspeed_shm_comm" / "lock"
    built = Path(os.environ.get("TORCH_EXTENSIONS_DIR", "")) / "deepspeed_shm_comm"
    if os.environ.get("TORCH_EXTENSIONS_DIR") and list(built.glob("*.so")):
        shutil.copytree(
            built, lock.parent
        )  # the build `.ci/run` made: torch takes the lock even for an up-to-date build
    else:
        lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - 600
    os.utime(lock, (old, old))
    p = subprocess.run(
        [sys.executable, "-m", "moeflow.launch.cli", "prepare", "deepspeed-ops"],
        capture_output=True,
        text=True,
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")},
        timeout=limit(300),
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "stale DeepSpeed build lock" in p.stderr and "DeepSpeed ops ready: deepspeed_shm_comm" in p.stdout
    assert not lock.exists() and list(lock.parent.glob("*.so"))  # cleared, then built (or found up to date)
