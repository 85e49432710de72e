"""Compose the trainer's Hydra config in-process, and the small settings trainer tests share."""

from __future__ import annotations

from hydra import compose, initialize_config_module

# Small, fast settings for trainer tests on a 2-core CPU.
TINY = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.d_ff=32",
    "model.num_experts=4",
    "model.max_seq_len=32",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.max_bytes=300000",
    "trainer.eval_batches=2",
    "trainer.log_every=2",
    "trainer.progress=false",
]


# a tiny bf16 run with master weights that checkpoints every step: the resume tests of test_master_*.py
MASTER_WEIGHTS_RUN = [
    *TINY,
    "trainer.precision=bf16",
    "optim.master_weights=true",
    "trainer.eval_every=0",
    "trainer.keep_checkpoints=0",
    "trainer.ckpt_every=1",
]


def compose_cfg(*overrides: str, run_dir=None):
    """The config `moeflow train OVERRIDES` runs (a resume takes its checkpoint's model, as on the command line)."""
    from moeflow.launch.recorded_model import adopt_recorded_model

    with initialize_config_module(config_module="moeflow.configs", version_base=None):
        cfg = compose(config_name="train", overrides=list(overrides))
    adopt_recorded_model(cfg, list(overrides), run_dir if run_dir is not None else ".")
    return cfg


def assert_refused_in_one_line(cases: list[tuple[list[str], str]], nproc: int = 2) -> None:
    """Each (overrides, message): the parallel checks of a `launcher=local launcher.nproc=NPROC` launch
    refuse it with a one-line ConfigError containing `message`."""
    import pytest

    from moeflow.launch.config import check_parallel, model_config
    from moeflow.moe.errors import ConfigError

    for overrides, message in cases:
        with initialize_config_module(config_module="moeflow.configs", version_base=None):
            cfg = compose(config_name="train", overrides=["launcher=local", f"launcher.nproc={nproc}", *overrides])
        with pytest.raises(ConfigError) as err:
            check_parallel(cfg, model_config(cfg))
        assert message in str(err.value) and "\n" not in str(err.value), (overrides, str(err.value))
