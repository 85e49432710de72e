"""Shared test helpers: compose the trainer's Hydra config in-process."""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module

# Small, fast settings for trainer tests on a 2-core CPU.
TINY = [
    "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=32", "model.num_experts=4",
    "model.max_seq_len=32", "data.seq_len=32", "data.batch_size=4", "data.max_bytes=300000",
    "trainer.eval_batches=2", "trainer.log_every=2", "trainer.progress=false",
]


def compose_cfg(*overrides: str):
    with initialize_config_module(config_module="moeflow.configs", version_base=None):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture(autouse=True)
def _single_thread_torch():
    """Tests run in parallel under xdist on 2 cores: one intra-op thread each avoids oversubscription."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
