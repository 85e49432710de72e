"""A GPU out-of-memory error mid-run comes out as one line naming the step and the settings that lower
the peak (launch/out_of_memory.py), and `moeflow bench train` goes on with the variants that fit."""

from __future__ import annotations

import pytest
import torch

from moeflow.launch.out_of_memory import OutOfMemory


def _fail_at_call(monkeypatch, n: int):
    """The engine's forward/backward raises torch's OutOfMemoryError from its n-th call on."""
    from moeflow.launch.engines.torch_engine import TorchEngine

    real, calls = TorchEngine.forward_backward, []

    def forward_backward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) >= n:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.64 GiB.")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TorchEngine, "forward_backward", forward_backward)


@pytest.mark.slow  # trains one step (a few seconds on 2 cores)
def test_an_out_of_memory_step_is_one_line_with_its_step_and_remedies(tmp_path, monkeypatch):
    from helpers.config import TINY, compose_cfg
    from moeflow.launch.train import train

    monkeypatch.setattr("moeflow.kernels.adamw.KERNEL", False)
    _fail_at_call(monkeypatch, 2)
    with pytest.raises(OutOfMemory) as err:
        train(compose_cfg(*TINY, "trainer.steps=4", "trainer.eval_every=0", "trainer.ckpt_every=0"), tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("out of GPU memory at step 2;")
    assert "data.batch_size=2 (trainer.grad_accum=2 keeps the batch)" in msg and "more GPUs" in msg
    assert "trainer.activation_checkpointing=full" in msg and "optim.moments_dtype=bfloat16" in msg
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)  # torch's own message stays with it
    assert err.value.exit_code == 1


@pytest.mark.parametrize(
    "overrides, present, absent",
    [
        (["data.batch_size=1"], ["optim.moments_dtype=bfloat16", "more GPUs"], ["data.batch_size="]),
        (
            ["data.batch_size=6", "trainer.grad_accum=2"],
            ["data.batch_size=3 (trainer.grad_accum=4 keeps the batch)"],
            [],
        ),
        (
            ["data.batch_size=5"],
            ["data.batch_size=1 (trainer.grad_accum=5 keeps the batch)"],
            [],
        ),  # odd: whole micro-batches
        (["data.global_batch_size=8"], ["data.batch_size=2 (data.global_batch_size keeps the batch)"], []),
        (
            ["optim.moments_dtype=bfloat16", "trainer.activation_checkpointing=full"],
            ["data.batch_size=2"],
            ["moments_dtype", "activation_checkpointing", "more GPUs"],  # bf16 moments need one process
        ),
        (
            ["trainer.precision=bf16", "optim.master_weights=true"],
            [
                "data.batch_size=2 (a smaller batch: optim.master_weights takes no trainer.grad_accum)",
                "master_remainders=true",
            ],
            ["grad_accum=2", "more GPUs"],
        ),
        (
            ["trainer.precision=bf16", "optim.master_weights=true", "optim.master_remainders=true"],
            ["data.batch_size=2"],
            ["master_remainders", "more GPUs"],
        ),
        (["engine=deepspeed"], ["data.batch_size=2", "more GPUs"], ["moments_dtype", "activation_checkpointing"]),
        (["launcher=local", "launcher.nproc=2"], ["more GPUs"], ["moments_dtype"]),
    ],
)
def test_remedies_name_only_what_this_run_can_still_take(overrides, present, absent):
    from helpers.config import TINY, compose_cfg
    from moeflow.launch.config import model_config, trainer_config
    from moeflow.launch.out_of_memory import out_of_memory

    cfg = compose_cfg(*TINY, *overrides)
    msg = str(out_of_memory(cfg, model_config(cfg), trainer_config(cfg), "at step 7", torch.device("cpu")))
    assert msg.startswith("out of GPU memory at step 7;"), msg
    assert all(p in msg for p in present) and not any(a in msg for a in absent), msg


def test_on_a_gpu_the_line_says_what_was_asked_held_and_left_fragmented(monkeypatch):
    """The CUDA figures, from torch.cuda's counters (faked here: this machine has no GPU)."""
    from types import SimpleNamespace

    from helpers.config import TINY, compose_cfg
    from moeflow.launch.config import model_config, trainer_config
    from moeflow.launch.out_of_memory import out_of_memory

    gib = 2**30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(total_memory=80 * gib))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: 41.25 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i: 30 * gib)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 36 * gib)
    cfg = compose_cfg(*TINY)
    oom = torch.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 4.64 GiB. GPU 0 has a total capacity of 79.18 GiB"
    )
    msg = str(out_of_memory(cfg, model_config(cfg), trainer_config(cfg), "at step 3", torch.device("cuda", 0), oom))
    assert msg.startswith(
        "out of GPU memory at step 3 (asked for 4.64 GiB; cuda:0: 41.2 of 80.0 GiB allocated at the peak"
    )
    assert "weights, gradients and AdamW state ~0.0 GiB of it)" in msg
    assert msg.endswith(
        "6.0 GiB were reserved but free (fragmentation): PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True may be enough"
    )
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i: 30.5 * gib)
    assert "fragmentation" not in str(
        out_of_memory(cfg, model_config(cfg), trainer_config(cfg), "x", torch.device("cuda", 0))
    )


@pytest.mark.slow  # trains one step (a few seconds on 2 cores)
def test_an_out_of_memory_error_wrapped_by_another_is_found(tmp_path, monkeypatch):
    """A pipeline stage re-raises the OOM as a RuntimeError (torch.distributed.pipelining), as
    torch.compile's backend errors do: the chain is followed."""
    from helpers.config import TINY, compose_cfg
    from moeflow.launch.engines.torch_engine import TorchEngine
    from moeflow.launch.out_of_memory import find_oom
    from moeflow.launch.train import train

    def wrapped(self, *args, **kwargs):
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        except torch.OutOfMemoryError as e:
            raise RuntimeError("[Stage 0] failed to run forward") from e

    monkeypatch.setattr(TorchEngine, "forward_backward", wrapped)
    with pytest.raises(OutOfMemory, match=r"^out of GPU memory at step 1;"):
        train(compose_cfg(*TINY, "trainer.steps=2", "trainer.eval_every=0", "trainer.ckpt_every=0"), tmp_path / "a")
    assert find_oom(RuntimeError("no")) is None


def test_a_global_batch_that_needs_accumulation_is_refused_with_master_weights():
    from helpers.config import TINY, compose_cfg
    from moeflow.launch.config import trainer_config
    from moeflow.launch.train import derive_grad_accum
    from moeflow.moe.errors import ConfigError

    cfg = compose_cfg(*TINY, "trainer.precision=bf16", "optim.master_weights=true", "data.global_batch_size=8")
    with pytest.raises(
        ConfigError, match=r"optim.master_weights=true needs trainer.grad_accum=1 .* set data.batch_size=8 or drop"
    ):
        derive_grad_accum(cfg, trainer_config(cfg), world=1)
    cfg = compose_cfg(*TINY, "trainer.precision=bf16", "optim.master_weights=true", "data.global_batch_size=4")
    derive_grad_accum(cfg, trainer_config(cfg), world=1)  # one micro-batch: fine


@pytest.mark.slow  # trains the dense variant (a few seconds on 2 cores)
def test_bench_reports_a_variant_that_ran_out_of_memory_and_runs_the_rest(tmp_path, monkeypatch, capsys):
    import moeflow.launch.train as trainer
    from moeflow.launch.bench import train as bench_train

    real = trainer.train

    def moe_does_not_fit(cfg, run_dir):
        if cfg.model.moe_every:
            raise OutOfMemory("out of GPU memory at step 1; lower the peak with data.batch_size=1")
        return real(cfg, run_dir)

    monkeypatch.setattr(trainer, "train", moe_does_not_fit)
    from helpers.bench import bench_train_args

    args = bench_train_args("moe,dense", tmp_path / "train.json")
    result = bench_train.run(args)
    moe, dense = result["variants"]
    assert moe["skipped"].startswith("out of GPU memory at step 1") and "tokens_per_s" not in moe
    assert dense["tokens_per_s"] > 0 and result["moe_over_dense"] is None
    assert "moe-torch        skipped: out of GPU memory" in capsys.readouterr().out
