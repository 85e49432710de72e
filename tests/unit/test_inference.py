"""Generation with the KV cache equals recomputing every prefix, and transformers' own greedy
generation for an imported model; eval reports the loss in the run's units and the expert load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers.config import TINY, compose_cfg
from moeflow.launch import inference
from moeflow.moe.config import ModelConfig
from moeflow.moe.errors import DataError
from moeflow.moe.model import KVCache, Transformer


def small_model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(
        **{
            "vocab_size": 64,
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "max_seq_len": 32,
            "d_ff": 16,
            "num_experts": 4,
            "top_k": 2,
            "qk_norm": True,
            "qk_norm_scope": "proj",
            **kw,
        }
    )
    return Transformer(cfg).eval()


def test_cached_logits_equal_the_full_forward():
    model = small_model()
    tokens = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)[0]
        cache = KVCache()
        steps = [model(tokens[:, :8], cache)[0]] + [model(tokens[:, i : i + 1], cache)[0] for i in range(8, 20)]
    got = torch.cat(steps)
    assert (got - full).abs().max() <= 1e-5 * full.abs().max()
    with pytest.raises(ValueError, match="one new token at a time"):
        model(tokens[:, :2], cache)


def test_greedy_generation_equals_argmax_of_recomputed_prefixes():
    model = small_model(n_kv_heads=None, qk_norm=False)
    prompt = [3, 14, 15, 9]
    got = inference.generate_ids(model, prompt, 10)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt) :]
    assert inference.generate_ids(model, prompt, 10, temperature=1.0, top_p=1e-9) == got  # nucleus of one token
    a = inference.generate_ids(model, prompt, 10, temperature=1.0, top_p=0.9, seed=5)
    assert a == inference.generate_ids(model, prompt, 10, temperature=1.0, top_p=0.9, seed=5)
    assert len(inference.generate_ids(model, list(range(30)), 10)) == 2  # stops at model.max_seq_len


@pytest.mark.slow  # trains (a few seconds on 2 cores)
def test_imported_model_generates_like_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from helpers.tokenizer import train_bpe
    from helpers.upcycle import make_hf_moe
    from moeflow.launch import convert

    theirs = make_hf_moe("qwen3_moe", tmp_path / "hf", vocab=600)
    train_bpe(tmp_path / "hf")  # the model folder's tokenizer, carried into the import
    convert.main(["hf-to-moeflow", str(tmp_path / "hf"), str(tmp_path / "mf")])
    text = inference.generate(_args(src=str(tmp_path / "mf"), prompt="def load(", max_new_tokens=12))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    ids = tok.encode("def load(", add_special_tokens=False).ids
    want = theirs.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[
        0, len(ids) :
    ]
    assert text == tok.decode(want.tolist(), skip_special_tokens=False)
    assert transformers is not None


def _args(**kw):
    import argparse

    base = {"max_new_tokens": 16, "temperature": 0.0, "top_p": 0.9, "seed": 0, "tokenizer": None}
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.slow  # trains (a few seconds on 2 cores)
def test_byte_level_run_generates_and_evaluates_in_bits_per_byte(tmp_path, capsys):
    from moeflow.launch.train import train

    run = tmp_path / "run"
    train(
        compose_cfg(*TINY, "trainer.steps=2", "trainer.ckpt_every=2", "trainer.eval_every=0", "trainer.device=cpu"), run
    )
    capsys.readouterr()
    inference.generate(_args(src=str(run), prompt="import ", max_new_tokens=8))
    assert capsys.readouterr().out.startswith("import ")
    data = tmp_path / "bytes.bin"
    np.frombuffer(b"def f(x):\n    return x\n" * 200, dtype=np.uint8).astype(np.uint16).tofile(data)
    import argparse

    result = inference.evaluate(
        argparse.Namespace(src=str(run), data=str(data), dtype="uint16", batches=2, batch_size=2, seq_len=16, seed=0)
    )
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2))
    assert len(result["expert_load"]) == 2 and all(abs(sum(f) - 1) < 1e-6 for f in result["expert_load"])
    assert "bits/byte" in capsys.readouterr().out


def test_eval_reads_the_file_once_in_order_and_says_how_much(tmp_path, capsys):
    """The loss over every whole window of the file, in order, equals a plain PyTorch reference on the
    same windows; it reports the tokens it scored, not more than the file holds."""
    import argparse

    import torch.nn.functional as F

    from moeflow.launch.train import train

    run = tmp_path / "run"
    train(
        compose_cfg(*TINY, "trainer.steps=1", "trainer.ckpt_every=1", "trainer.eval_every=0", "trainer.device=cpu"), run
    )
    tokens = np.random.default_rng(3).integers(0, 256, 1000).astype(np.uint16)
    tokens.tofile(tmp_path / "val.bin")
    args = argparse.Namespace(
        src=str(run),
        data=str(tmp_path / "val.bin"),
        dtype="uint16",
        batch_size=4,
        seq_len=32,
        max_tokens=None,
        batches=None,
    )
    result = inference.evaluate(args)
    windows = (1000 - 1) // 32
    assert result["tokens"] == windows * 32 and result["windows"] == windows and result["file_tokens"] == 1000
    model, _, _ = inference.load_model(str(run))
    t = torch.from_numpy(tokens[: windows * 32 + 1].astype(np.int64))
    x = torch.stack([t[i * 32 : i * 32 + 32] for i in range(windows)])
    y = torch.stack([t[i * 32 + 1 : i * 32 + 33] for i in range(windows)])
    with torch.no_grad():
        want = F.cross_entropy(model(x).double().flatten(0, 1), y.flatten()).item()
    assert result["loss"] == pytest.approx(want, rel=1e-5)
    assert f"on {windows * 32} of its 1000 tokens" in capsys.readouterr().out
    capped = inference.evaluate(argparse.Namespace(**{**vars(args), "max_tokens": 100}))
    assert capped["tokens"] == 96


def test_a_byte_level_run_evaluates_text_files_and_refuses_other_tokenizers_ids(tmp_path):
    """A run on data=stdlib reads text as its bytes; a prepared token file (another tokenizer's ids) is one line."""
    import argparse
    import json

    from moeflow.launch.train import train

    run = tmp_path / "run"
    train(
        compose_cfg(*TINY, "trainer.steps=1", "trainer.ckpt_every=1", "trainer.eval_every=0", "trainer.device=cpu"), run
    )
    text = "def f(x):\n    return x + 1\n" * 40
    (tmp_path / "notes.txt").write_text(text)
    np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint16).tofile(tmp_path / "bytes.bin")
    args = dict(src=str(run), dtype="uint16", batch_size=4, seq_len=32, max_tokens=None, batches=None)
    from_text = inference.evaluate(argparse.Namespace(data=str(tmp_path / "notes.txt"), **args))
    from_ids = inference.evaluate(argparse.Namespace(data=str(tmp_path / "bytes.bin"), **args))
    assert from_text["loss"] == pytest.approx(from_ids["loss"], rel=1e-6) and "bits_per_byte" in from_text
    prepared = tmp_path / "corpus"
    prepared.mkdir()
    np.arange(200, dtype=np.uint16).tofile(prepared / "val.bin")
    (prepared / "meta.json").write_text(
        json.dumps({"dtype": "uint16", "vocab_size": 600, "tokenizer": "/models/x/tokenizer.json"})
    )
    with pytest.raises(DataError, match="trained on the bytes of text .* evaluate it on a text file"):
        inference.evaluate(argparse.Namespace(data=str(prepared / "val.bin"), **args))
