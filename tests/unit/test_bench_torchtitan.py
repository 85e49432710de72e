"""`moeflow bench train`'s torchtitan variant: torchtitan's own model is built at the bench's shape (its
parameter count against moeflow's, on the meta device), and the row says why when it can't run. The
timed run itself needs CUDA (tests/gpu/test_bench_torchtitan_gpu.py)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from helpers.bench import bench_train_args
from moeflow.launch.bench import torchtitan_variant as titan
from moeflow.launch.bench import train as bench_train
from moeflow.launch.config import model_config
from moeflow.moe.param_count import param_counts


def _shape_cfg(shape: str, *extra: str):
    return model_config(bench_train.compose([*bench_train.SHAPES[shape], "model.n_layers=2", *extra]))


@pytest.mark.parametrize("shape", ["olmoe-like", "mixtral-like", "e128"])
def test_torchtitans_model_of_each_bench_shape_has_moeflows_parameters(shape):
    pytest.importorskip("torchtitan")
    from torchtitan.models.qwen3.model.model import Qwen3Model

    cfg = _shape_cfg(shape)
    margs = titan.qwen3_args(cfg, 2048, grouped_mm=False)
    assert not isinstance(margs, str), margs
    with torch.device("meta"):
        model = Qwen3Model(margs)
    total, _ = param_counts(cfg)
    head_dim = cfg.head_dim or cfg.d_model // cfg.n_heads
    kv_dim = (cfg.n_kv_heads or cfg.n_heads) * head_dim
    # torchtitan normalises q and k per head (head_dim weights); OLMoE normalises the whole projection
    per_proj = cfg.d_model - head_dim + kv_dim - head_dim if cfg.qk_norm_scope == "proj" else 0
    assert sum(p.numel() for p in model.parameters()) == total - cfg.n_layers * per_proj
    moe = model.layers["0"].moe
    assert moe.experts.w1.shape == (cfg.num_experts, cfg.d_ff, cfg.d_model)  # experts x hidden x model
    assert moe.router.top_k == cfg.top_k and moe.shared_experts is None


@pytest.mark.parametrize(
    "override, named",
    [
        ("model.activation=gelu", "activation=gelu"),
        ("model.moe_every=2", "moe_every=2"),
        ("gate=expert_choice", "gate=expert_choice"),  # a gate without top-k's keys: named, not a KeyError
        ("gate=sinkhorn", "gate=sinkhorn"),
        ("gate=switch", "gate.dropless=False"),  # capacity and dropping: torchtitan's model is dropless
        ("gate.noise_std=0.1", "gate.noise_std=0.1"),
    ],
)
def test_a_shape_torchtitans_model_cannot_express_is_named(override, named):
    pytest.importorskip("torchtitan")
    reason = titan.qwen3_args(_shape_cfg("e128", override), 64, grouped_mm=False)
    assert isinstance(reason, str) and named in reason, reason


def test_the_row_lists_what_it_does_otherwise_than_the_moeflow_rows():
    olmoe = _shape_cfg("olmoe-like")
    overrides = [
        "optim.master_weights=true",
        "optim.moments_dtype=bfloat16",
        "model.n_layers=4",
        "trainer.compile=true",
    ]
    said = " | ".join(titan.differences(olmoe, overrides))
    assert "load-balancing" in said and "per head" in said
    assert "optim.master_weights=true optim.moments_dtype=bfloat16 (torchtitan: fp32" in said
    assert "n_layers" not in said and "trainer.compile" not in said  # these shape and compile both
    assert "per head" not in " ".join(titan.differences(_shape_cfg("e128"), []))  # Qwen3: per head in both


def test_out_of_memory_is_the_rows_and_the_compile_setting_is_put_back(monkeypatch):
    """A torchtitan row that does not fit says so in its row (the rows measured before it are kept), and
    torchtitan's apply_compile, which sets a Dynamo option process-wide, leaves it as it was."""
    pytest.importorskip("torchtitan")
    import torchtitan.models.llama4.infra.parallelize as titan_parallelize

    def compile_like_torchtitan(model, config, ep_enabled):
        torch._dynamo.config.capture_scalar_outputs = True

    def out_of_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(titan, "build", lambda cfg, seq_len, device: torch.nn.Linear(2, 2))  # no CUDA here
    monkeypatch.setattr(titan_parallelize, "apply_compile", compile_like_torchtitan)
    monkeypatch.setattr(titan, "time_plain_loop", out_of_memory)
    args = bench_train_args("torchtitan")
    said = {
        "variant": "torchtitan-compiled",
        "skipped": "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB",
    }
    # Dynamo's own patch, not monkeypatch: monkeypatch's undo deletes a Dynamo config option (later compiles fail)
    with torch._dynamo.config.patch(capture_scalar_outputs=False):
        row = titan.torchtitan_variant(_shape_cfg("e128"), args, torch.device("cuda"), True)
        assert row == said
        assert torch._dynamo.config.capture_scalar_outputs is False
        monkeypatch.setattr(titan, "build", out_of_memory)  # the model's own weights do not fit
        assert titan.torchtitan_variant(_shape_cfg("e128"), args, torch.device("cuda"), True) == said


def test_the_torchtitan_row_says_why_it_did_not_run(tmp_path, monkeypatch, capsys):
    out = tmp_path / "train.json"
    bench_train.run(bench_train_args("torchtitan", out))  # the CPU
    saved = json.loads(out.read_text())
    (row,) = saved["variants"]
    expected = "CUDA only" if "torchtitan" in sys.modules or _importable("torchtitan") else "not importable"
    assert row["variant"] == "torchtitan" and expected in row["skipped"]
    assert saved["torchtitan_tokens_per_s"] is None and saved["moe_over_torchtitan"] is None
    assert "torchtitan       skipped:" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "torchtitan", None)  # as on a machine without it
    row = titan.torchtitan_variant(_shape_cfg("e128"), bench_train_args("torchtitan"), torch.device("cpu"), True)
    assert row["variant"] == "torchtitan-compiled" and "pip install moeflow[torchtitan]" in row["skipped"]


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_torchtitans_model_trains_in_the_bench_loop_on_the_cpu(monkeypatch):
    """The row's own path short of CUDA: torchtitan's model built and initialised by `build`, stepped by
    the plain loop with torchtitan's clipping. Its router counts tokens with torch.histc on integers,
    which the CPU lacks; counted here on floats (the same counts) so the rest runs."""
    pytest.importorskip("torchtitan")
    real_histc = torch.histc
    monkeypatch.setattr(torch, "histc", lambda x, *a, **k: real_histc(x.float(), *a, **k).to(x.dtype))
    from moeflow.launch.bench.plain_loop import time_plain_loop

    cfg = _shape_cfg("tiny", "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.d_ff=16")
    args = bench_train_args("torchtitan", seq_len=16, batch_size=2, steps=2)
    model = titan.build(cfg, args.seq_len, torch.device("cpu"))
    with_gradient = set()  # AdamW's weight decay moves a weight whose gradient is zero: count the gradients
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: with_gradient.add(p) if p.grad.abs().sum() > 0 else None)
    timed = time_plain_loop(lambda m, tokens: m(tokens), model, cfg.vocab_size, args, torch.device("cpu"), max_norm=1.0)
    assert timed["tokens_per_s"] > 0 and timed["forward_s"] > 0 and timed["optimizer_s"] > 0
    assert abs(timed["final_loss"] - math.log(cfg.vocab_size)) < 1.0  # random tokens: about ln(vocab) nats
    assert with_gradient == set(model.parameters())  # every weight learns, the router and the experts included
