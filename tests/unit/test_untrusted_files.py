"""Files from elsewhere are data: a hostile pickle in a checkpoint never runs.

Each file below, when unpickled without restriction, would create a marker file; moeflow must
refuse it in one line and the marker must not exist afterwards.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch

from helpers.config import TINY, compose_cfg
from moeflow.launch.train import train
from moeflow.moe.errors import CheckpointError, MoeflowError


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def good_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("good")
    train(compose_cfg(*TINY, "trainer.steps=1", "trainer.eval_every=0", "trainer.ckpt_every=1"), run)
    return run


def test_a_hostile_dcp_metadata_file_is_refused(tmp_path, good_run):
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    marker = tmp_path / "PWNED"
    ckpt_dir = next((run / "checkpoints").iterdir())
    (ckpt_dir / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match=r"asks to load posix\.system.*refusing to unpickle"):
        train(compose_cfg(*TINY, "trainer.steps=2", "resume=auto"), run)
    assert not marker.exists()


def test_a_hostile_legacy_trainer_state_is_refused(tmp_path, good_run):
    """An older moeflow's layout (model.safetensors + trainer_state.pt) whose pickle calls os.system."""
    from moeflow.parallel.checkpoint import read_full_tensors
    from safetensors.torch import save_file

    src = next((good_run / "checkpoints").iterdir())
    old = tmp_path / "old" / "checkpoints" / "step_00000001"
    old.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in read_full_tensors(src, "model.").items()}, str(old / "model.safetensors"))
    meta = json.loads((src / "meta.json").read_text())
    (old / "meta.json").write_text(json.dumps({**meta, "format": "legacy"}))
    marker = tmp_path / "PWNED"
    with open(old / "trainer_state.pt", "wb") as f:
        pickle.dump({"step": 1, "x": Payload(marker)}, f)
    with pytest.raises(CheckpointError, match="not loadable without running code"):
        train(compose_cfg(*TINY, "trainer.steps=2", f"resume={old}"), tmp_path / "b")
    assert not marker.exists()


def test_a_legacy_trainer_state_of_plain_values_still_loads(tmp_path):
    """What older moeflow versions wrote (tensors, numpy RNG state) loads through weights_only."""
    import random

    import numpy as np

    from moeflow.launch.checkpoint import load_trainer_state

    state = {"step": 3, "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
             "optimizer": {"state": {0: {"exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-3}]}}
    torch.save(state, tmp_path / "trainer_state.pt")
    loaded = load_trainer_state(tmp_path)
    assert loaded["step"] == 3 and torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])


def test_a_megatron_pickle_needs_an_explicit_opt_in(tmp_path):
    from moeflow.parallel.integrations import megatron_ckpt as mck

    ckpt = tmp_path / "meg" / "iter_0000001" / "mp_rank_00"
    ckpt.mkdir(parents=True)
    marker = tmp_path / "PWNED"
    with open(ckpt / "model_optim_rng.pt", "wb") as f:
        pickle.dump({"model": {}, "args": Payload(marker)}, f)
    with pytest.raises(MoeflowError, match="pickles.*--trust-checkpoint"):
        mck.load_megatron(tmp_path / "meg" / "iter_0000001")
    assert not marker.exists()
