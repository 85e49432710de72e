"""Hugging Face MoE models in and out (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): equal logits and
gradients against transformers' own model, a training step after import, exact exports or
refusals naming the option."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[hf]'")

from helpers.config import compose_cfg  # noqa: E402
from helpers.upcycle import MOE_KINDS, assert_logits_close, make_hf, make_hf_moe, tokens  # noqa: E402
from moeflow.launch import convert  # noqa: E402
from moeflow.launch.hf_models import round_parameters  # noqa: E402
from moeflow.launch.upcycle import cli as upcycle_cli  # noqa: E402
from moeflow.moe import hf_moe  # noqa: E402
from moeflow.moe.errors import MoeflowError  # noqa: E402
from moeflow.moe.hf_convert import read_checkpoint  # noqa: E402


def run_convert(*argv: str):
    return convert.main([str(a) for a in argv])


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_import_gives_equal_logits_and_gradients(kind, tmp_path):
    theirs = make_hf_moe(kind, tmp_path / "hf")
    mine, _ = hf_moe.load_moe(tmp_path / "hf")
    x = tokens(seq=12)
    assert_logits_close(mine(x), theirs(x).logits)

    def loss_of(logits):
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())

    mine.train(), theirs.train()
    loss_of(mine(x)).backward()
    loss_of(theirs(x).logits).backward()
    # transformers keeps experts fused in memory; its own save_pretrained writes the published layout,
    # so the gradients go through it: parameters replaced by their gradients, saved, read back
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    theirs.save_pretrained(str(tmp_path / "grads"))
    their_grads = read_checkpoint(tmp_path / "grads").tensors
    # the weight mapping is linear (permutations, transposes, stacking): it maps gradients too
    want = hf_moe.hf_moe_to_moeflow_state(mine.cfg, their_grads, kind)
    got = {n: p.grad for n, p in mine.named_parameters()}
    assert set(got) == set(want) - {n for n in want if "rotary" in n}
    for name, g in got.items():
        scale = want[name].abs().max().item()
        assert (g - want[name]).abs().max().item() <= 1e-5 * max(scale, 1e-6), name


def test_imported_features_are_the_architectures():
    """What each import turns on, so the equality above covers the new model options."""
    import transformers as T  # noqa: F401

    def cfg_of(kind, tmp):
        make_hf_moe(kind, tmp)
        return hf_moe.load_moe(tmp)[0].cfg

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        q2, ol, q3 = (
            cfg_of("qwen2_moe", Path(d) / "a"),
            cfg_of("olmoe", Path(d) / "b"),
            cfg_of("qwen3_moe", Path(d) / "c"),
        )
    assert (
        q2.shared_expert_gate
        and q2.shared_hidden == 24
        and q2.moe_every == 2
        and q2.attn_bias
        and q2.gate["renormalize"]
    )
    assert ol.qk_norm and ol.qk_norm_scope == "proj" and not ol.gate["renormalize"]
    assert q3.qk_norm and q3.qk_norm_scope == "head" and not q3.shared_experts


def corpus(path, vocab: int):
    np.random.default_rng(0).integers(0, vocab, size=4000).astype(np.uint16).tofile(path)
    return path


@pytest.mark.slow  # trains (a few seconds on 2 cores)
@pytest.mark.parametrize("kind", ["qwen2_moe", "olmoe"])
def test_cli_import_trains_then_exports_back_exactly(kind, tmp_path, capsys):
    from moeflow.launch.data import BatchSampler, load_splits
    from moeflow.launch.train import train

    theirs = make_hf_moe(kind, tmp_path / "hf", vocab=128)
    out = tmp_path / "imported"
    run_convert("hf-to-moeflow", tmp_path / "hf", out)
    printed = capsys.readouterr().out
    assert "verify moeflow vs transformers" in printed and "parameters" in printed
    cmd = json.loads((out / "convert.json").read_text())["train_command"]
    assert cmd == shlex.join(["moeflow", "train", f"resume={out.resolve()}"])

    overrides = shlex.split(cmd)[2:] + [
        "data=memmap",
        f"data.path={corpus(tmp_path / 'tokens.bin', 128)}",
        "data.seq_len=16",
        "data.batch_size=4",
        "trainer.steps=1",
        "trainer.eval_every=0",
        "trainer.ckpt_every=1",
        "trainer.device=cpu",
        "trainer.precision=fp32",
        "trainer.progress=false",
        "trainer.seed=3",
        "experts.impl=torch",
        "gate.aux_loss_coef=0.0",
    ]
    cfg = compose_cfg(*overrides)
    x, y = BatchSampler(load_splits(cfg.data).train, 16, 4, 3).batch(0, 0, 0)
    with torch.no_grad():
        want = F.cross_entropy(theirs(x).logits.flatten(0, 1), y.flatten()).item()
    result = train(cfg, tmp_path / "run")
    assert result["start_step"] == 0 and result["step"] == 1
    assert result["train_loss"] == pytest.approx(want, rel=1e-5)  # the imported model is transformers' model

    run_convert("moeflow-to-hf", tmp_path / "run", tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
    assert back.config.model_type == kind
    from moeflow.launch import checkpoint as ckpt
    from moeflow.launch.hf_models import load_moeflow

    model_cfg, _, found = load_moeflow(tmp_path / "run")
    trained = hf_moe.build_from_state(model_cfg, ckpt.load_full_weights(found))
    xt = tokens(seq=12, vocab=128)
    assert_logits_close(back(xt).logits, trained(xt))
    with torch.no_grad():  # training moved the weights: the export is of the trained model
        assert not torch.allclose(back(xt).logits, theirs(xt).logits, atol=1e-4)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_cli_roundtrip_without_training(kind, tmp_path, capsys):
    """A large model is imported in shards and verified on its first layers (tiny limits force both here)."""
    theirs = make_hf_moe(kind, tmp_path / "hf", num_hidden_layers=3)
    run_convert("hf-to-moeflow", tmp_path / "hf", tmp_path / "mf", "--shard-gib", "0.0001", "--verify-full-gib", "0")
    assert "first 2 of 3 layers" in capsys.readouterr().out
    assert (tmp_path / "mf" / "checkpoints" / "step_00000000" / "model.safetensors.index.json").is_file()
    run_convert("moeflow-to-hf", tmp_path / "mf", tmp_path / "back", "--dtype", "bfloat16")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32).eval()
    x = tokens(seq=12)
    ref = round_parameters(theirs, torch.bfloat16)  # the export holds bf16 weights
    assert_logits_close(back(x).logits, ref(x).logits)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"


# each option the Hugging Face classes cannot compute: the upcycle export refuses it by name
REFUSED_OPTIONS = [
    (["--gate-option", 'score_func="sigmoid"'], "gate.score_func=sigmoid"),
    (["--gate-option", "dropless=false", "--gate-option", "capacity_factor=1.25"], "gate.dropless=false"),
    (["--gate-option", "n_groups=2", "--gate-option", "topk_groups=1"], "gate.n_groups"),
    (["--gate-option", "bias_update_rate=0.001"], "gate.bias_update_rate"),
    (["--gate-option", "renormalize=false"], "gate.renormalize=false"),
    (["--gate", "expert_choice"], "gate=expert_choice"),
]


@pytest.mark.parametrize("options,named", REFUSED_OPTIONS, ids=[r[1] for r in REFUSED_OPTIONS])
def test_upcycle_hf_export_refuses_what_the_target_cannot_compute(options, named, tmp_path):
    make_hf("llama", tmp_path / "dense")
    with pytest.raises(MoeflowError, match="cannot be exported as mixtral exactly") as err:
        upcycle_cli.upcycle(
            [
                str(tmp_path / "dense"),
                str(tmp_path / "moe"),
                "--format",
                "hf",
                "--num-experts",
                "4",
                "--top-k",
                "2",
                *options,
            ]
        )
    assert named in str(err.value)
    assert not (tmp_path / "moe").exists()


def test_upcycle_auto_format_writes_moeflow_only_when_not_exact(tmp_path, capsys):
    make_hf("qwen2", tmp_path / "dense")
    upcycle_cli.upcycle(
        [
            str(tmp_path / "dense"),
            str(tmp_path / "moe"),
            "--num-experts",
            "4",
            "--top-k",
            "2",
            "--gate-option",
            'score_func="sigmoid"',
        ]
    )
    assert "no exact qwen2_moe export" in capsys.readouterr().out
    assert (tmp_path / "moe" / "checkpoints").is_dir() and not (tmp_path / "moe" / "hf").exists()


def test_moeflow_to_hf_refuses_before_reading_weights(tmp_path):
    make_hf("llama", tmp_path / "dense")
    upcycle_cli.upcycle(
        [
            str(tmp_path / "dense"),
            str(tmp_path / "moe"),
            "--format",
            "moeflow",
            "--num-experts",
            "4",
            "--top-k",
            "2",
            "--gate-option",
            "bias_update_rate=0.01",
        ]
    )
    for w in (tmp_path / "moe").rglob("*.safetensors"):
        w.write_bytes(b"corrupt")  # never read: the refusal comes first
    with pytest.raises(MoeflowError, match="gate.bias_update_rate"):
        run_convert("moeflow-to-hf", tmp_path / "moe", tmp_path / "hf", "--arch", "mixtral")
    assert not (tmp_path / "hf").exists()


def test_verification_failure_writes_nothing(tmp_path, monkeypatch):
    make_hf_moe("mixtral", tmp_path / "hf")
    real = hf_moe.iter_moeflow_tensors

    def swapped_experts(model_cfg, tensors, kind, check_unused=True):
        for name, t in real(model_cfg, tensors, kind, check_unused):
            yield name, (t.flip(0) if name == "blocks.0.ffn.experts.w2_EFD" else t)

    monkeypatch.setattr(hf_moe, "iter_moeflow_tensors", swapped_experts)
    with pytest.raises(MoeflowError, match="verification failed"):
        run_convert("hf-to-moeflow", tmp_path / "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_sources_fail_in_one_line(tmp_path):
    with pytest.raises(MoeflowError, match="is not a folder"):
        run_convert("hf-to-moeflow", tmp_path / "nowhere", tmp_path / "out")
    ds = tmp_path / "deepseek"
    ds.mkdir()
    (ds / "config.json").write_text(json.dumps({"model_type": "deepseek_v3"}))
    with pytest.raises(
        MoeflowError,
        match="multi-head latent attention.*supported MoE architectures: mixtral, qwen2_moe, qwen3_moe, olmoe",
    ):
        run_convert("hf-to-moeflow", ds, tmp_path / "out")
    (ds / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(MoeflowError, match="'gpt_neox' cannot be imported; supported MoE architectures"):
        run_convert("hf-to-moeflow", ds, tmp_path / "out")
    make_hf_moe("olmoe", tmp_path / "olmoe")
    (tmp_path / "olmoe" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(MoeflowError, match="unreadable"):
        run_convert("hf-to-moeflow", tmp_path / "olmoe", tmp_path / "out")
    assert not (tmp_path / "out").exists()
