"""Upcycling API: function preservation (moeflow and generic path), granular upcycling, options."""

from __future__ import annotations

import pytest
import torch

from helpers import requires
from helpers.upcycle import assert_logits_close, tokens
from moeflow.moe import GATES
from moeflow.moe.experts import GroupedExperts, expert_mlp
from moeflow.moe.model import ModelConfig, Transformer
from moeflow.moe.upcycle import (
    ModuleExperts,
    UpcycleError,
    UpcycleOptions,
    moe_layers,
    upcycle_model,
    upcycle_transformer,
)


def dense_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        max_seq_len=32,
        d_ff=64,
        dense_d_ff=64,
        num_experts=1,
        top_k=1,
        moe_every=0,
    )
    model = Transformer(ModelConfig(**{**cfg, **kw})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize(
    "opts",
    [
        dict(num_experts=4, top_k=2),
        dict(
            num_experts=8, top_k=1, router_init="normal", router_std=0.5
        ),  # any routing is exact with identical experts
        dict(num_experts=4, top_k=2, shared_expert=True, shared_fraction=0.25),
        dict(num_experts=4, top_k=2, moe_every=2),
    ],
    ids=["zero-router", "normal-router", "shared-expert", "moe-every-2"],
)
def test_moeflow_upcycle_preserves_logits(opts):
    dense = dense_model(n_kv_heads=2, attn_bias=True, qk_norm=True)
    moe = upcycle_transformer(dense, UpcycleOptions(**opts)).eval()
    o = UpcycleOptions(**opts)
    assert moe.cfg.num_experts == o.num_experts and moe.cfg.top_k == o.top_k
    assert len(moe.moe_layers()) == (1 if o.moe_every == 2 else 2)
    x = tokens(vocab=64)
    assert_logits_close(moe(x), dense(x))


def test_one_expert_moe_checkpoint_is_a_dense_source():
    dense = dense_model(moe_every=1)  # the trainer with num_experts=1
    moe = upcycle_transformer(dense, UpcycleOptions(num_experts=4, top_k=2)).eval()
    x = tokens(vocab=64)
    assert_logits_close(moe(x), dense(x))
    with pytest.raises(UpcycleError, match="already a mixture of 4 experts"):
        upcycle_transformer(moe, UpcycleOptions(num_experts=4, top_k=2))


def test_granular_slices_sum_to_the_dense_mlp():
    """(c): the m fine-grained experts, all active with weight 1, sum to the dense MLP.

    The upcycled experts store slice j's down projection times m; the gate that makes
    this exact is softmax top-k with renormalisation over a selection holding every
    slice equally often, e.g. all m slices (weight 1/m each, times m = 1).
    """
    dense = dense_model()
    m = 4
    moe = upcycle_transformer(dense, UpcycleOptions(num_experts=1, top_k=1, granularity=m)).eval()
    experts, mlp = moe.blocks[0].ffn.experts, dense.blocks[0].ffn
    assert experts.num_experts == m and experts.d_ff == 64 // m and moe.cfg.top_k == m
    x = torch.randn(10, 32, dtype=torch.float64)
    w = {k: v.double() for k, v in experts.named_parameters()}
    total = sum(expert_mlp(x, w["w1_EDF"][j], w["w3_EDF"][j], w["w2_EFD"][j] / m) for j in range(m))
    want = mlp.double()(x)
    torch.testing.assert_close(total, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "opts",
    [
        dict(num_experts=4, top_k=2, granularity=4),  # auto: tied small-normal router
        dict(num_experts=2, top_k=2, granularity=4, router_init="zero"),  # all 8 experts active
        dict(num_experts=4, top_k=1, granularity=2, shared_expert=True),
    ],
    ids=["tied-normal-router", "zero-router-all-active", "with-shared-expert"],
)
def test_granular_upcycle_preserves_logits(opts):
    o = UpcycleOptions(**opts)
    assert o.exact
    dense = dense_model()
    moe = upcycle_transformer(dense, o).eval()
    assert moe.cfg.num_experts == o.num_experts * o.granularity and moe.cfg.top_k == o.top_k * o.granularity
    x = tokens(vocab=64)
    assert_logits_close(moe(x), dense(x))


def test_which_settings_are_promised_exact():
    """A zero router ties every expert; top-k may then pick an unbalanced set of slices."""
    assert not UpcycleOptions(num_experts=4, top_k=1, granularity=2, router_init="zero").exact
    assert UpcycleOptions(num_experts=4, top_k=1, granularity=2).exact  # auto ties rows per copy
    assert not UpcycleOptions(num_experts=4, top_k=2, gate_options={"renormalize": False}).exact  # weights sum to k/E
    assert not UpcycleOptions(num_experts=4, top_k=2, expert_noise=0.01).exact


def test_expert_noise_diversifies_copies():
    dense = dense_model()
    moe = upcycle_transformer(dense, UpcycleOptions(num_experts=4, top_k=2, expert_noise=0.01, seed=3)).eval()
    w1 = moe.blocks[0].ffn.experts.w1_EDF
    assert not torch.equal(w1[0], w1[1])
    x = tokens(vocab=64)
    rel = (moe(x) - dense(x)).abs().max() / dense(x).abs().max()
    assert 0 < rel < 0.05


def test_bad_options():
    with pytest.raises(UpcycleError, match="top_k=5"):
        UpcycleOptions(num_experts=4, top_k=5)
    with pytest.raises(UpcycleError, match="granularity=3 does not divide"):
        upcycle_transformer(dense_model(), UpcycleOptions(num_experts=2, top_k=1, granularity=3))
    with pytest.raises(UpcycleError, match="nope.*known gates"):
        upcycle_transformer(dense_model(), UpcycleOptions(num_experts=2, top_k=1, gate="nope"))


def test_grouped_experts_with_biases_match_float64_reference():
    torch.manual_seed(0)
    for act in ("swiglu", "gelu"):
        ex = GroupedExperts(3, 8, 16, act, bias=True).double()
        with torch.no_grad():
            for b in (ex.b1_EF, ex.b3_EF, ex.b2_ED):
                if b is not None:
                    b.normal_()
        counts = torch.tensor([2, 0, 3])
        x = torch.randn(5, 8, dtype=torch.float64)
        got = ex(x, counts)
        rows = [0, 0, 2, 2, 2]
        for a, e in enumerate(rows):
            h = x[a] @ ex.w1_EDF[e] + ex.b1_EF[e]
            h = (
                torch.nn.functional.silu(h) * (x[a] @ ex.w3_EDF[e] + ex.b3_EF[e])
                if act == "swiglu"
                else torch.nn.functional.gelu(h, approximate="tanh")
            )
            torch.testing.assert_close(got[a], h @ ex.w2_EFD[e] + ex.b2_ED[e])


# -- the generic path on transformers module trees -------------------------------------


@requires.transformers
def test_generic_gpt2_grouped_experts_with_biases(tmp_path):
    import transformers

    from helpers.upcycle import make_hf

    dense = make_hf("gpt2", tmp_path / "d")
    moe = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "d")).eval()
    replaced = upcycle_model(moe, num_experts=4, top_k=2)
    assert replaced == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    layers = moe_layers(moe)
    assert len(layers) == 2 and isinstance(layers[0].experts, GroupedExperts) and layers[0].experts.b1_EF is not None
    x = tokens()
    assert_logits_close(moe(x).logits, dense(x).logits)
    moe.train()  # dropout of the original MLP is kept around the MoE layer
    assert isinstance(moe.transformer.h[0].mlp.dropout, torch.nn.Dropout)


@requires.transformers
def test_generic_gpt2_granular_and_shared(tmp_path):
    import transformers

    from helpers.upcycle import make_hf

    dense = make_hf("gpt2", tmp_path / "d")
    moe = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "d")).eval()
    upcycle_model(moe, num_experts=2, top_k=1, granularity=4, shared_expert=True)
    x = tokens()
    assert_logits_close(moe(x).logits, dense(x).logits)


@requires.transformers
def test_generic_llama_module_tree(tmp_path):
    import transformers

    from helpers.upcycle import make_hf

    dense = make_hf("llama", tmp_path / "d")
    moe = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "d")).eval()
    assert upcycle_model(moe, num_experts=4, top_k=2, granularity=2) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    x = tokens()
    assert_logits_close(moe(x).logits, dense(x).logits)


@requires.transformers
def test_generic_bert_encoder_copies_the_module():
    """BERT's MLP spans two modules and uses erf-GELU: experts are whole-module copies."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
    )
    dense = transformers.BertModel(cfg).eval()
    moe = transformers.BertModel(cfg).eval()
    moe.load_state_dict(dense.state_dict())
    replaced = upcycle_model(moe, num_experts=4, top_k=2)
    assert replaced == ["encoder.layer.0", "encoder.layer.1"]
    assert isinstance(moe_layers(moe)[0].experts, ModuleExperts)
    x = tokens()
    assert_logits_close(moe(x).last_hidden_state, dense(x).last_hidden_state)


@requires.transformers
def test_generic_selector_and_errors(tmp_path):
    import transformers

    from helpers.upcycle import make_hf

    make_hf("gpt2", tmp_path / "d")
    moe = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "d")).eval()
    assert upcycle_model(moe, num_experts=2, top_k=1, selector=r"h\.1\.mlp$") == ["transformer.h.1.mlp"]
    with pytest.raises(UpcycleError, match="selector matched no module"):
        upcycle_model(moe, num_experts=2, top_k=1, selector="nothing-here")


@pytest.mark.skipif("dts" not in GATES, reason="the dts gate is not in this tree yet")
@pytest.mark.parametrize("granularity", [1, 2])
@requires.transformers
def test_evomoe_route_with_dts_gate(granularity):
    """EvoMoE: the trained dense MLP (one expert) diversified into many, routed by the DTS gate.

    At step 0 the DTS gate is fully dense (every expert active, softmax weights summing
    to 1), so identical copies reproduce the dense model exactly (eval mode: no Gumbel noise).
    """
    dense = dense_model()
    opts = UpcycleOptions(num_experts=4, top_k=2, gate="dts", granularity=granularity)
    assert opts.exact
    moe = upcycle_transformer(dense, opts).eval()
    assert type(moe.blocks[0].ffn.gate).__name__ != "TopKGate"
    x = tokens(vocab=64)
    assert_logits_close(moe(x), dense(x))
    noisy = upcycle_transformer(dense, UpcycleOptions(num_experts=4, top_k=2, gate="dts", expert_noise=0.01)).eval()
    rel = (noisy(x) - dense(x)).abs().max() / dense(x).abs().max()
    assert 0 < rel < 0.05


@requires.transformers
def test_generic_path_on_a_plain_torch_module():
    """upcycle_model also recognises moeflow's own MLP (w1/w3/w2) inside any nn.Module."""

    from moeflow.moe.experts import MLP

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), MLP(16, 32, "swiglu"), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(3, 5, 8)
    want = net(x)
    assert upcycle_model(net, num_experts=4, top_k=2, granularity=2) == ["1"]
    assert isinstance(net[1].experts, GroupedExperts) and net[1].experts.num_experts == 8
    assert_logits_close(net(x), want)
