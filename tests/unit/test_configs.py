"""Every number a config or the README states about a model is what the model really has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from helpers.config import compose_cfg
from moeflow.launch.config import model_config
from moeflow.moe.model import Transformer

ROOT = Path(__file__).resolve().parents[2]


def counts(model: str) -> tuple[float, float]:
    """(total, active) parameters in millions, built on the meta device."""
    mc = model_config(compose_cfg(f"model={model}", "trainer.device=cpu"))
    with torch.device("meta"):
        m = Transformer(mc)
    return m.num_params() / 1e6, m.num_params(active_only=True) / 1e6


def stated(text: str, pattern: str) -> tuple[str, str]:
    m = re.search(pattern, text)
    assert m, f"no parameter counts stated ({pattern!r})"
    return m.group(1), m.group(2)


def rounded_like(value: float, text_value: str) -> str:
    """`value` written with as many decimals as the stated figure has."""
    decimals = len(text_value.split(".")[1]) if "." in text_value else 0
    return f"{value:.{decimals}f}"


@pytest.mark.parametrize("model", ["tiny", "small"])
def test_model_config_comments_state_the_real_parameter_counts(model):
    first_line = (ROOT / "configs" / "model" / f"{model}.yaml").read_text().splitlines()[0]
    total, active = stated(first_line, r"\(([\d.]+)M total parameters, ([\d.]+)M active")
    real_total, real_active = counts(model)
    assert (rounded_like(real_total, total), rounded_like(real_active, active)) == (total, active), (
        real_total,
        real_active,
    )


def test_readme_states_the_default_models_parameter_counts():
    total, active = stated((ROOT / "README.md").read_text(), r"([\d.]+)M parameters, ([\d.]+)M active per token")
    real_total, real_active = counts("tiny")
    assert (rounded_like(real_total, total), rounded_like(real_active, active)) == (total, active)


@pytest.mark.parametrize("gate", sorted(p.stem for p in (ROOT / "configs" / "gate").glob("*.yaml")))
def test_every_gate_config_builds_the_model(gate):
    mc = model_config(compose_cfg(f"gate={gate}", "trainer.device=cpu"))
    with torch.device("meta"):
        assert Transformer(mc).moe_layers()


def test_tensor_parallelism_is_one_key_for_every_engine():
    """parallel.tp is the one tensor-parallel size (engine.tensor_parallel folded into it): megatron reads
    it, DeepSpeed and torch refuse tp > 1 in one line naming the engine that has it."""
    import pytest

    from helpers.config import compose_cfg
    from moeflow.launch.config import validate
    from moeflow.moe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"engine=megatron .* with parallel.tp=2"):
        validate(compose_cfg("parallel.tp=2", "launcher=local", "launcher.nproc=2"))
    pytest.importorskip("deepspeed")
    with pytest.raises(ConfigError, match=r"engine=deepspeed has no tensor parallelism here; use engine=megatron"):
        validate(compose_cfg("engine=deepspeed", "parallel.tp=2", "trainer.device=cpu"))
    with pytest.raises(Exception, match="tensor_parallel"):  # no such key any more: Hydra refuses it
        compose_cfg("engine=megatron", "engine.tensor_parallel=2")
