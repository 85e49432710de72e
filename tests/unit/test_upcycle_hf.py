"""Hugging Face folders -> moeflow MoE and Mixtral / Qwen2-MoE / Qwen3-MoE, through `moeflow upcycle`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[hf]'")

from helpers.upcycle import assert_logits_close, make_hf, tokens  # noqa: E402
from moeflow.launch import cli  # noqa: E402
from moeflow.launch.upcycle import cli as upcycle_cli  # noqa: E402
from moeflow.launch.upcycle import run as upcycle_run  # noqa: E402
from moeflow.moe import hf_convert as hf  # noqa: E402
from moeflow.moe.upcycle import UpcycleOptions, upcycle_transformer  # noqa: E402

CASES = {
    # kind, config overrides, upcycle options, expected HF class
    "llama": (
        "llama",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
        dict(num_experts=4, top_k=2),
        "MixtralForCausalLM",
    ),
    "mistral": (
        "mistral",
        dict(sliding_window=32, head_dim=16),
        dict(num_experts=4, top_k=2, granularity=2),
        "MixtralForCausalLM",
    ),
    "qwen2": (
        "qwen2",
        dict(tie_word_embeddings=True),
        dict(num_experts=4, top_k=2, shared_expert=True),
        "Qwen2MoeForCausalLM",
    ),
    "qwen2-no-shared": ("qwen2", dict(), dict(num_experts=4, top_k=1, moe_every=2), "Qwen2MoeForCausalLM"),
    "qwen3": ("qwen3", dict(head_dim=16), dict(num_experts=4, top_k=2, granularity=2), "Qwen3MoeForCausalLM"),
}


def cli_args(src, out, opts: dict, *extra):
    args = [str(src), str(out)]
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        args += [flag] if v is True else [flag, str(v)]
    return [*args, *extra]


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("case", list(CASES))
def test_hf_family_upcycle_and_export(tmp_path, case, capsys):
    """(a) moeflow MoE logits == dense; (b) the exported HF MoE loads with AutoModelForCausalLM and matches."""
    kind, overrides, opts, hf_class = CASES[case]
    dense_hf = make_hf(kind, tmp_path / "dense", **overrides)
    x = tokens()
    want = dense_hf(x).logits

    dense, _ = hf.load_dense(tmp_path / "dense")
    assert_logits_close(dense(x), want)
    moe = upcycle_transformer(dense, UpcycleOptions(**opts)).eval()
    assert_logits_close(moe(x), want)

    report = upcycle_cli.upcycle(cli_args(tmp_path / "dense", tmp_path / "out", opts))
    assert report["verify"]["moeflow"]["max_rel_diff"] <= 1e-5 and report["verify"]["hf"]["max_rel_diff"] <= 1e-5
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "hf")).eval()
    assert type(exported).__name__ == hf_class
    assert_logits_close(exported(x).logits, want)
    assert "verify moeflow MoE vs dense" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_sharded_checkpoint_and_missing_shard(tmp_path):
    dense_hf = make_hf("llama", tmp_path / "d")
    dense_hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    dense, _ = hf.load_dense(tmp_path / "sharded")
    x = tokens()
    assert_logits_close(dense(x), dense_hf(x).logits)
    shards[1].unlink()
    with pytest.raises(hf.ConversionError, match=f"missing 1 of {len(shards)} shards.*{shards[1].name}"):
        hf.load_dense(tmp_path / "sharded")


def _edit_config(folder: Path, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_config_weights_mismatch(tmp_path):
    make_hf("llama", tmp_path / "d")
    _edit_config(tmp_path / "d", intermediate_size=96)
    with pytest.raises(
        hf.ConversionError, match=r"do not match its config.json.*mlp.down_proj.weight: \(32, 64\) vs config \(32, 96\)"
    ):
        hf.load_dense(tmp_path / "d")


def test_tied_embeddings_handled_explicitly(tmp_path):
    tied = make_hf("qwen2", tmp_path / "tied", tie_word_embeddings=True)
    dense, _ = hf.load_dense(tmp_path / "tied")
    assert dense.cfg.tie_embeddings and dense.lm_head.weight is dense.embed.weight
    assert_logits_close(dense(tokens()), tied(tokens()).logits)
    # config claims tying but the file holds a different lm_head
    make_hf("llama", tmp_path / "untied")
    _edit_config(tmp_path / "untied", tie_word_embeddings=True)
    with pytest.raises(hf.ConversionError, match="tie_word_embeddings=true but lm_head.weight differs"):
        hf.load_dense(tmp_path / "untied")
    # config says untied but there is no lm_head
    _edit_config(tmp_path / "tied", tie_word_embeddings=False)
    with pytest.raises(hf.ConversionError, match="no lm_head.weight and config.json says tie_word_embeddings=false"):
        hf.load_dense(tmp_path / "tied")


def test_unsupported_architecture_names_supported_ones(tmp_path, capsys):
    (tmp_path / "falcon").mkdir()
    (tmp_path / "falcon" / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    with pytest.raises(SystemExit) as e:
        cli.main(["upcycle", str(tmp_path / "falcon"), str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("moeflow upcycle: error:")
    for word in ("'falcon'", "llama", "mistral", "qwen2", "qwen3", "gpt2", "--generic", "upcycle_model"):
        assert word in err
    assert not (tmp_path / "out").exists()


def test_output_is_never_half_written(tmp_path, monkeypatch, capsys):
    make_hf("llama", tmp_path / "d")
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit):
        cli.main(["upcycle", str(tmp_path / "d"), str(tmp_path / "out")])
    assert "already exists" in capsys.readouterr().err
    # a failure after writing started (here: verification) leaves neither output nor temp folder
    monkeypatch.setattr(upcycle_run, "VERIFY_RTOL", -1.0)
    with pytest.raises(SystemExit):
        cli.main(["upcycle", str(tmp_path / "d"), str(tmp_path / "new"), "--num-experts", "2", "--top-k", "1"])
    assert "verification failed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "out"]


def test_gpt2_generic_path_cli_roundtrip(tmp_path):
    dense = make_hf("gpt2", tmp_path / "gpt2")
    report = upcycle_cli.upcycle([str(tmp_path / "gpt2"), str(tmp_path / "out"), "--num-experts", "4", "--top-k", "2"])
    assert report["verify"]["generic"]["max_rel_diff"] <= 1e-5
    reloaded = hf.load_upcycled(tmp_path / "out")
    x = tokens()
    assert_logits_close(reloaded(x).logits, dense(x).logits)
    with pytest.raises(SystemExit):
        cli.main(["upcycle", str(tmp_path / "gpt2"), str(tmp_path / "o2"), "--format", "hf"])


def test_bf16_source_exports_bf16_and_trains_in_float32(tmp_path):
    make_hf("llama", tmp_path / "d").to(torch.bfloat16).save_pretrained(str(tmp_path / "bf16"))
    upcycle_cli.upcycle([str(tmp_path / "bf16"), str(tmp_path / "out"), "--num-experts", "2", "--top-k", "1"])
    with __import__("safetensors").safe_open(str(tmp_path / "out" / "hf" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.block_sparse_moe.experts.1.w1.weight").dtype == torch.bfloat16
    with __import__("safetensors").safe_open(
        str(tmp_path / "out" / "moeflow" / "checkpoints" / "step_00000000" / "model.safetensors"), "pt"
    ) as f:
        assert f.get_tensor("blocks.0.ffn.experts.w1_EDF").dtype == torch.float32
    report = upcycle_cli.upcycle(
        [str(tmp_path / "bf16"), str(tmp_path / "out16"), "--dtype", "bfloat16", "--format", "moeflow"]
    )
    assert report["verify"]["moeflow"]["max_rel_diff"] <= 5e-2
    with __import__("safetensors").safe_open(
        str(tmp_path / "out16" / "checkpoints" / "step_00000000" / "model.safetensors"), "pt"
    ) as f:
        assert f.get_tensor("blocks.0.ffn.experts.w1_EDF").dtype == torch.bfloat16
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "out" / "hf"), dtype=torch.float32
    ).eval()
    dense = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype=torch.float32).eval()
    assert_logits_close(exported(tokens()).logits, dense(tokens()).logits)  # bf16 values copy exactly


def test_pickle_only_and_corrupt_weights(tmp_path):
    make_hf("llama", tmp_path / "d")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text((tmp_path / "d" / "config.json").read_text())
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(hf.ConversionError, match="only pickle weights.*safe_serialization=True"):
        hf.load_dense(tmp_path / "pickle")
    data = (tmp_path / "d" / "model.safetensors").read_bytes()
    (tmp_path / "d" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(hf.ConversionError, match="model.safetensors is unreadable"):
        hf.load_dense(tmp_path / "d")


def test_gate_options_without_hf_equivalent_write_moeflow_only(tmp_path, capsys):
    make_hf("llama", tmp_path / "d")
    report = upcycle_cli.upcycle(
        [str(tmp_path / "d"), str(tmp_path / "out"), "--num-experts", "4", "--gate-option", "renormalize=false"]
    )
    assert (tmp_path / "out" / "checkpoints").is_dir() and not (tmp_path / "out" / "hf").exists()
    assert report["verify"]["moeflow"]["max_rel_diff"] > 1e-3  # weights sum to k/E: not a copy, reported
    assert "renormalize: false" in (tmp_path / "out" / "configs" / "gate" / "upcycled.yaml").read_text()
    with pytest.raises(SystemExit):
        cli.main(
            [
                "upcycle",
                str(tmp_path / "d"),
                str(tmp_path / "o2"),
                "--format",
                "hf",
                "--gate-option",
                "renormalize=false",
            ]
        )
    assert "gate.renormalize=false" in capsys.readouterr().err


def test_generic_upcycle_of_an_encoder_without_lm_head_verifies(tmp_path):
    """A MiniLM-style encoder saved as BertModel has no LM head: transformers invents one at random on
    every load. The check compares the hidden states the upcycle changes (it once failed on the head)."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=64,
    )
    T.BertModel(cfg).save_pretrained(str(tmp_path / "minilm"))
    report = upcycle_cli.upcycle(
        [str(tmp_path / "minilm"), str(tmp_path / "out"), "--generic", "--num-experts", "4", "--top-k", "2"]
    )
    assert report["verify"]["generic"]["max_rel_diff"] <= 1e-5
    assert report["replaced_modules"]
