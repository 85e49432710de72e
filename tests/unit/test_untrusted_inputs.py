"""Token folders and model folders are data from elsewhere: their metadata is checked against the
files, and no path in them leads outside their folder."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from moeflow.launch.data import load_memmap
from moeflow.moe.errors import CheckpointError, DataError, MoeflowError


def prepared(folder, tokens: np.ndarray, dtype: str, vocab: int, val: np.ndarray | None = None, **meta_over):
    """A folder as `moeflow data prepare` leaves it: train.bin, val.bin, meta.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tokens.astype(dtype).tofile(folder / "train.bin")
    val = tokens[:64] if val is None else val
    val.astype(dtype).tofile(folder / "val.bin")
    meta = {
        "dtype": dtype,
        "vocab_size": vocab,
        "train": {"tokens": int(tokens.size), "documents": 1},
        "val": {"tokens": int(val.size), "documents": 1},
        "val_file": "val.bin",
        **meta_over,
    }
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder / "train.bin"


def test_a_uint32_file_labelled_uint16_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    path = prepared(tmp_path / "d", rng.integers(0, 70000, 5000), "uint32", 70000)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    (tmp_path / "d" / "meta.json").write_text(json.dumps({**meta, "dtype": "uint16", "vocab_size": 60000}))
    with pytest.raises(DataError, match="bytes but its meta.json counts 5000 uint16 tokens"):
        load_memmap(str(path), None, "uint16", 1.0)


def test_ids_above_the_declared_vocab_are_refused_before_training(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 1000, 300_000)
    tokens[::977] = 1500  # spread through the file, as in a file of another tokenizer
    path = prepared(tmp_path / "d", tokens, "uint16", 1000)
    with pytest.raises(DataError, match="holds token id 1500, outside the vocabulary of 1000"):
        load_memmap(str(path), None, "uint16", 1.0)


@pytest.mark.parametrize("val_file", ["../../outside.bin", "/etc/hostname"])
def test_a_val_file_outside_the_folder_is_refused(tmp_path, val_file):
    path = prepared(tmp_path / "a" / "b" / "d", np.arange(500) % 50, "uint16", 50, val_file=val_file)
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "a" / "outside.bin")
    with pytest.raises(DataError, match="points outside its folder"):
        load_memmap(str(path), None, "uint16", 1.0)


def test_a_good_prepared_folder_still_loads(tmp_path):
    path = prepared(tmp_path / "d", np.random.default_rng(2).integers(0, 300, 4000), "uint16", 300)
    splits = load_memmap(str(path), None, "uint16", 1.0)
    assert splits.vocab_size == 300 and len(splits.train) == 4000 and len(splits.val) == 64


def test_an_hf_index_naming_files_outside_the_folder_is_refused(tmp_path):
    from moeflow.moe.hf_convert import ConversionError, weight_files

    (tmp_path / "m").mkdir()
    (tmp_path / "x.safetensors").write_bytes(b"not ours")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../x.safetensors"}}))
    with pytest.raises(ConversionError, match="outside"):
        weight_files(tmp_path / "m")


def test_a_consolidated_index_naming_other_files_is_refused(tmp_path):
    from moeflow.launch import checkpoint as ckpt

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="not this checkpoint's weight shards"):
        ckpt.weight_files(tmp_path)


@pytest.mark.parametrize("flag, value", [("batches", 0), ("batch_size", -1), ("seq_len", 0), ("seq_len", 100000)])
def test_eval_refuses_bad_numbers_in_one_line(tmp_path, flag, value):
    from helpers.config import TINY, compose_cfg
    from moeflow.launch.inference import evaluate
    from moeflow.launch.train import train

    train(compose_cfg(*TINY, "trainer.steps=1", "trainer.eval_every=0", "trainer.ckpt_every=1"), tmp_path / "run")
    data = prepared(tmp_path / "d", np.arange(5000) % 200, "uint16", 200)
    args = argparse.Namespace(
        src=str(tmp_path / "run"), data=str(data), dtype="uint16", batches=2, batch_size=2, seq_len=None, seed=0
    )
    setattr(args, flag, value)
    with pytest.raises(MoeflowError, match=f"--{flag.replace('_', '-')}={value}"):
        evaluate(args)


@pytest.mark.parametrize("flag, value", [("max_new_tokens", -1), ("temperature", -1.0), ("top_p", 0.0), ("top_p", 2.0)])
def test_generate_refuses_bad_sampling_settings(flag, value):
    from moeflow.launch.inference import generate

    args = argparse.Namespace(
        src="/nonexistent", prompt="x", max_new_tokens=4, temperature=0.0, top_p=0.9, seed=0, tokenizer=None
    )
    setattr(args, flag, value)
    with pytest.raises(MoeflowError, match=f"--{flag.replace('_', '-')}={value}"):
        generate(args)


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lr=1e39", "optim.lr=1e.39 is not valid"),
        ("trainer.seed=100000000000000000000", "trainer.seed=.* is not valid"),
        ("model.init_std=0", "model.init_std must be a number > 0"),
        ("model.moe_every=3", "leaves no MoE block"),
    ],
)
def test_out_of_range_numbers_fail_in_one_line(override, match):
    from helpers.config import compose_cfg
    from moeflow.launch.config import validate

    with pytest.raises(MoeflowError, match=match):
        validate(compose_cfg("model.n_layers=2", override))


def test_integer_betas_train(tmp_path):
    """optim.betas=[0,0] (integers from the command line) once failed inside AdamW with a traceback."""
    from helpers.config import TINY, compose_cfg
    from moeflow.launch.train import train

    assert (
        train(
            compose_cfg(*TINY, "optim.betas=[0,0]", "trainer.steps=1", "trainer.eval_every=0", "trainer.ckpt_every=0"),
            tmp_path,
        )["step"]
        == 1
    )


def test_a_model_that_cannot_fit_is_refused_before_anything_is_allocated():
    from helpers.config import compose_cfg
    from moeflow.launch.config import validate

    with pytest.raises(
        MoeflowError, match=r"model.num_experts=200000.*take [\d,]+ GiB per rank, more than this machine's"
    ):
        validate(compose_cfg("model.num_experts=200000", "model.d_ff=4096", "trainer.device=cpu"))
    validate(compose_cfg("model.num_experts=64", "trainer.device=cpu"))  # a model that fits passes


def test_generate_with_a_file_that_is_no_tokenizer_is_one_line(tmp_path):
    from moeflow.launch.inference import HFTokenizer

    (tmp_path / "tokenizer.json").write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(DataError, match="is not a tokenizer.json the tokenizers library reads"):
        HFTokenizer(tmp_path)
