"""`moeflow data prepare`: the ids are exactly the tokenizers library's, one EOS after each
document, the split is by document, every input format gives the same ids, a killed run
resumes to the same files, and training runs on the output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers", reason="needs tokenizers (comes with transformers): pip install -e '.[hf]'")

from helpers.config import compose_cfg  # noqa: E402
from helpers.tokenizer import EOS, stdlib_package, train_bpe  # noqa: E402
from moeflow.launch import data_prepare  # noqa: E402
from moeflow.moe.errors import DataError  # noqa: E402

CORPUS = stdlib_package("email")  # real text on every machine (20 modules)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("tok"))


def prepare(*inputs, tokenizer, out, extra=()):
    return data_prepare.main(
        ["prepare", *map(str, inputs), "--tokenizer", str(tokenizer), "--out", str(out), "--no-progress", *extra]
    )


def expected(texts, tokenizer, val_percent):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    eos = tok.token_to_id(EOS)
    split = {"train": [], "val": []}
    for i, text in enumerate(texts):
        ids = tok.encode(text, add_special_tokens=False).ids + [eos]
        split["val" if data_prepare.is_val(i, val_percent) else "train"].extend(ids)
    return split


def read(out, split, dtype="uint16"):
    return np.fromfile(out / f"{split}.bin", dtype=dtype).tolist()


def corpus_texts():
    return [p.read_text() for p in sorted(CORPUS.glob("*.py"))]


def test_ids_are_the_tokenizers_ids_with_eos_between_documents(tokenizer, tmp_path):
    prepare(
        CORPUS,
        tokenizer=tokenizer,
        out=tmp_path / "out",
        extra=["--glob", "*.py", "--val-percent", "30", "--workers", "2"],
    )
    want = expected(corpus_texts(), tokenizer, 30)
    assert read(tmp_path / "out", "train") == want["train"]
    assert read(tmp_path / "out", "val") == want["val"]
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 600 and meta["val_file"] == "val.bin"
    assert meta["train"]["documents"] + meta["val"]["documents"] == len(corpus_texts())
    assert meta["train"]["tokens"] == len(want["train"]) and 0 < meta["val"]["documents"]


def test_jsonl_parquet_and_datasets_folder_give_the_same_ids(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = corpus_texts()
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    pq.write_table(pa.table({"body": texts}), str(tmp_path / "docs.parquet"))
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "state.json").write_text("{}")
    with pa.OSFile(str(ds / "data-00000-of-00001.arrow"), "wb") as sink:  # what datasets' save_to_disk writes
        table = pa.table({"body": texts})
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    want = expected(texts, tokenizer, 0)["train"]
    for name in ("docs.jsonl", "docs.parquet", "ds"):
        prepare(
            tmp_path / name,
            tokenizer=tokenizer,
            out=tmp_path / f"out-{name}",
            extra=["--field", "body", "--val-percent", "0", "--workers", "1"],
        )
        assert read(tmp_path / f"out-{name}", "train") == want, name


@pytest.mark.slow  # trains (a few seconds on 2 cores)
def test_killed_run_resumes_to_the_same_files(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(data_prepare, "CHUNK_DOCS", 3)
    args = ["--glob", "*.py", "--val-percent", "30", "--workers", "1"]
    prepare(CORPUS, tokenizer=tokenizer, out=tmp_path / "whole", extra=args)

    real, calls = data_prepare.load_tokenizer, {"n": 0}

    def dies_on_third_chunk(spec):
        loaded = real(spec)

        def encode_or_die(texts):
            calls["n"] += 1
            if calls["n"] == 3:
                raise KeyboardInterrupt
            return loaded.encode(texts)

        return loaded._replace(encode=encode_or_die)

    monkeypatch.setattr(data_prepare, "load_tokenizer", dies_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        prepare(CORPUS, tokenizer=tokenizer, out=tmp_path / "part", extra=args)
    with open(tmp_path / "part" / "train.bin", "ab") as f:
        f.write(b"\x07\x00" * 5)  # a write the kill interrupted, after the last recorded chunk
    with pytest.raises(DataError, match="--resume"):
        prepare(CORPUS, tokenizer=tokenizer, out=tmp_path / "part", extra=args)
    monkeypatch.setattr(data_prepare, "load_tokenizer", real)
    prepare(CORPUS, tokenizer=tokenizer, out=tmp_path / "part", extra=[*args, "--resume"])
    for split in ("train", "val"):
        assert read(tmp_path / "part", split) == read(tmp_path / "whole", split)
    assert not (tmp_path / "part" / data_prepare.STATE).exists()


@pytest.mark.slow  # trains (a few seconds on 2 cores)
def test_training_runs_on_the_output_and_checks_the_vocab(tokenizer, tmp_path):
    from moeflow.launch.train import train

    prepare(
        CORPUS,
        tokenizer=tokenizer,
        out=tmp_path / "out",
        extra=["--glob", "*.py", "--val-percent", "30", "--workers", "1"],
    )
    base = [
        "data=memmap",
        f"data.path={tmp_path / 'out' / 'train.bin'}",
        "data.seq_len=32",
        "data.batch_size=2",
        "model=tiny",
        "model.n_layers=1",
        "model.d_model=32",
        "model.n_heads=2",
        "model.d_ff=32",
        "model.num_experts=2",
        "model.top_k=1",
        "trainer.steps=1",
        "trainer.eval_every=1",
        "trainer.eval_batches=1",
        "trainer.ckpt_every=0",
        "trainer.device=cpu",
        "trainer.progress=false",
    ]
    result = train(compose_cfg(*base, "model.vocab_size=600"), tmp_path / "run")
    assert result["step"] == 1 and np.isfinite(result["train_loss"])
    with pytest.raises(DataError, match=r"model.vocab_size=500; raise model.vocab_size"):
        train(compose_cfg(*base, "model.vocab_size=500"), tmp_path / "run2")


@pytest.mark.slow  # trains (a few seconds on 2 cores)
def test_large_vocab_is_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70000)} | {"[UNK]": 70000, EOS: 70001}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "doc.txt").write_text("w1 w69999 w5")
    prepare(
        tmp_path / "doc.txt", tokenizer=tmp_path / "tokenizer.json", out=tmp_path / "out", extra=["--val-percent", "0"]
    )
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["dtype"] == "uint32"
    assert read(tmp_path / "out", "train", "uint32") == [1, 69999, 5, 70001]


def test_bad_input_fails_in_one_line(tokenizer, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "missing", tokenizer=tokenizer, out=tmp_path / "o")
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(DataError, match="--tokenizer .* does not exist"):
        prepare(tmp_path / "a.txt", tokenizer=tmp_path / "nope.json", out=tmp_path / "o")
    (tmp_path / "b.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match="b.jsonl:1 has no 'text' field; pass --field"):
        prepare(tmp_path / "b.jsonl", tokenizer=tokenizer, out=tmp_path / "o")
    with pytest.raises(DataError, match="--eos-token 'nope' is not a token"):
        prepare(tmp_path / "a.txt", tokenizer=tokenizer, out=tmp_path / "o", extra=["--eos-token", "nope"])


def test_mixture_draws_each_set_by_weight_and_is_split_invariant(tokenizer, tmp_path):
    from moeflow.launch.data import MixtureSampler, training_samplers

    texts = {"a": "aaaa " * 2000, "b": "zzzz " * 2000}
    for name, text in texts.items():
        (tmp_path / f"{name}.txt").write_text(text)
        prepare(tmp_path / f"{name}.txt", tokenizer=tokenizer, out=tmp_path / name, extra=["--val-percent", "0"])
    cfg = compose_cfg(
        "data=memmap",
        "data.seq_len=8",
        "data.batch_size=4",
        "data.val_percent=10",
        f"data.mix=[{{path: {tmp_path / 'a' / 'train.bin'}, weight: 3}}, {{path: {tmp_path / 'b' / 'train.bin'}, weight: 1}}]",
    )
    _, train, _ = training_samplers(cfg.data, 600, seed=0)
    assert isinstance(train, MixtureSampler)
    a_ids = set(np.fromfile(tmp_path / "a" / "train.bin", dtype="uint16").tolist())
    rows = [train.batch(step, 0)[0] for step in range(200)]
    from_a = sum(set(r.tolist()) <= a_ids for batch in rows for r in batch)
    assert 0.7 < from_a / (200 * 4) < 0.8  # weight 3:1
    whole = train.batch(5, 0, 0, 1)[0]
    halves = [MixtureSampler(train.samplers, [3, 1], 0) for _ in range(2)]
    for h in halves:
        h.batch_size = 2
    assert torch.equal(torch.cat([halves[r].batch(5, 0, r, 2)[0] for r in range(2)]), whole)


def test_a_non_text_field_is_refused(tokenizer, tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"text": 123}\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: 'text' holds a int, not text"):
        prepare(tmp_path / "c.jsonl", tokenizer=tokenizer, out=tmp_path / "out")


def test_an_unwritable_output_folder_is_one_line(tokenizer, tmp_path):
    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "blocker").write_text("a file where a folder would go")
    with pytest.raises(DataError, match="cannot write into --out"):
        prepare(tmp_path / "a.txt", tokenizer=tokenizer, out=tmp_path / "blocker" / "out")


def test_binary_inputs_are_refused_by_name_or_counted(tokenizer, tmp_path):
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)
    with pytest.raises(DataError, match="blob.bin is a binary file"):
        prepare(tmp_path / "blob.bin", tokenizer=tokenizer, out=tmp_path / "out1")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("some text about things\n" * 50)
    (folder / "b.pyc").write_bytes(b"\x00\x01" * 50)
    prepare(folder, tokenizer=tokenizer, out=tmp_path / "out2", extra=["--glob", "*"])
    assert json.loads((tmp_path / "out2" / "meta.json").read_text())["skipped_binary_files"] == 1


def test_truncation_and_padding_saved_in_a_tokenizer_are_switched_off(tmp_path, capsys):
    """A BERT-style tokenizer.json saved with truncation and padding to 128 (as sentence-transformers'
    MiniLM ships): every document must still be whole, with no [PAD] in the corpus (it once kept 3%)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    files = sorted(str(p) for p in stdlib_package().rglob("*.py"))
    tok.train(
        files,
        trainers.WordPieceTrainer(
            vocab_size=800, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]"], show_progress=False
        ),
    )
    plain = [tok.encode(open(f).read(), add_special_tokens=False).ids for f in files]
    tok.enable_truncation(max_length=128)
    tok.enable_padding(length=128, pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))

    prepare(
        stdlib_package(),
        tokenizer=tmp_path / "tok" / "tokenizer.json",
        out=tmp_path / "out",
        extra=["--eos-token", "[SEP]", "--glob", "*.py", "--val-percent", "0"],
    )
    said = capsys.readouterr().out
    assert "saved with truncation to 128 tokens and padding to 128 with '[PAD]': switched off" in said
    ids = np.asarray(read(tmp_path / "out", "train"))
    assert len(ids) == sum(len(d) + 1 for d in plain)  # every document whole, one [SEP] after each
    assert not (ids == tok.token_to_id("[PAD]")).any()
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["documents"] == len(files) and meta["tokens_per_document"] == pytest.approx(
        sum(map(len, plain)) / len(files)
    )
    unk = sum(d.count(tok.token_to_id("[UNK]")) for d in plain)
    assert meta["unk_rate"] == pytest.approx(unk / sum(map(len, plain)))
    assert meta["tokenizer_switched_off"] == ["truncation to 128 tokens", "padding to 128 with '[PAD]'"]
    # the data carries the tokenizer as it was used: truncation and padding off, loadable by transformers
    copy = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer" / "tokenizer.json"))
    assert copy.truncation is None and copy.padding is None
    assert meta["tokenizer_dir"] == "tokenizer" and Path(meta["tokenizer"]).is_absolute()
    transformers = pytest.importorskip("transformers")
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out" / "tokenizer"))
    assert auto(open(files[0]).read(), add_special_tokens=False)["input_ids"] == plain[0] and auto.eos_token == "[SEP]"


def test_existing_token_files_are_never_overwritten_without_force(tokenizer, tmp_path, capsys):
    """A folder holding someone's train.bin (nanoGPT's, no meta.json) was once truncated to nothing."""
    out = tmp_path / "out"
    out.mkdir()
    theirs = np.arange(1000, dtype=np.uint16)
    theirs.tofile(out / "train.bin")
    with pytest.raises(
        DataError, match=r"already holds train.bin; pass --force to replace them, or choose a new --out"
    ):
        prepare(CORPUS, tokenizer=tokenizer, out=out)
    assert np.array_equal(np.fromfile(out / "train.bin", dtype=np.uint16), theirs)
    prepare(CORPUS, tokenizer=tokenizer, out=out, extra=["--force"])
    assert "--force: removed train.bin" in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["train"]["tokens"] == len(read(out, "train"))
