"""trainer.compile_scope: the whole model as one torch.compile region, or each block compiled in place
(launch/engines/torch_engine.compiled_forward). Compilation is lazy, so this checks the wiring on the
CPU; the compiled step's numbers are checked on the GPU (tests/gpu/test_compile_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from moeflow.launch.engines.torch_engine import compiled_forward
from moeflow.moe.config import ModelConfig
from moeflow.moe.model import Transformer


def _model():
    return Transformer(ModelConfig(d_model=32, n_layers=3, n_heads=4, d_ff=32, num_experts=4, top_k=2, max_seq_len=16))


def test_blocks_scope_compiles_each_block_in_place_and_keeps_the_names():
    model = _model()
    names = [n for n, _ in model.named_parameters()]
    fwd = compiled_forward(model, "blocks")
    assert fwd is model and [n for n, _ in model.named_parameters()] == names  # no _orig_mod. in checkpoint keys
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert model._compiled_call_impl is None  # the embedding, final norm and head stay eager


def test_model_scope_wraps_the_whole_model_and_leaves_its_blocks_alone():
    model = _model()
    fwd = compiled_forward(model, "model")
    assert fwd is not model and fwd._orig_mod is model
    assert all(block._compiled_call_impl is None for block in model.blocks)


def test_pipeline_stages_compile_by_block_whatever_the_scope():
    model = _model()
    model.blocks = torch.nn.ModuleDict({str(i): b for i, b in enumerate(model.blocks)})  # a stage's layout
    assert compiled_forward(model, "model", pipelined=True) is model
    assert all(block._compiled_call_impl is not None for block in model.blocks.values())


def test_an_unknown_scope_is_refused_in_one_line():
    from helpers.config import TINY, compose_cfg
    from moeflow.launch import schema
    from moeflow.moe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"trainer.compile_scope"):
        schema.check(compose_cfg(*TINY, "trainer.compile_scope=layers"))


def test_compile_settings_that_would_be_ignored_are_refused_in_one_line():
    from helpers.config import TINY, compose_cfg
    from moeflow.launch.config import validate
    from moeflow.moe.errors import ConfigError

    with pytest.raises(ConfigError, match=r"trainer.compile_scope=blocks does nothing without trainer.compile=true"):
        validate(compose_cfg(*TINY, "trainer.compile_scope=blocks"))
    with pytest.raises(ConfigError, match=r"trainer.compile=true needs engine=torch"):
        validate(compose_cfg(*TINY, "trainer.compile=true", "engine=deepspeed"))


def test_optional_kernels_resolve_inside_a_compiled_region_without_dynamo_warnings(monkeypatch):
    """The gate's top-k and the combine's gather-sum pick their Triton kernel inside the compiled forward.
    A functools.cache there made Dynamo warn ("lru_cache-wrapped function") in every compiled run."""
    import warnings

    from moeflow.moe import routing
    from moeflow.moe.gates import common

    monkeypatch.setattr(common, "_topk", common._UNRESOLVED)  # resolve for the first time while tracing
    monkeypatch.setattr(routing, "_gather_sum_kernel", routing._UNRESOLVED)

    def pick(x):
        return x * 2 if common._topk_kernel() is not None and routing._gather_sum() is not None else x

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(pick, backend="eager", fullgraph=True)(torch.ones(3))
    assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]
    pytest.importorskip("triton")
    from moeflow.kernels.combine import gather_sum
    from moeflow.kernels.topk import topk_indices

    assert common._topk is topk_indices and routing._gather_sum_kernel is gather_sum
    assert torch.equal(out, torch.full((3,), 2.0))
