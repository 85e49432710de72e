"""A real byte-level BPE tokenizer (the `tokenizers` library), trained in a second on stdlib sources."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

EOS = "<|endoftext|>"


def stdlib_package(name: str = "json") -> Path:
    return Path(sysconfig.get_paths()["stdlib"]) / name


def train_bpe(folder: Path, vocab_size: int = 600, corpus: Path | None = None) -> Path:
    """tokenizer.json + tokenizer_config.json (eos_token) in `folder`; returns the tokenizer.json path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    files = sorted(str(p) for p in (corpus or stdlib_package()).rglob("*.py"))
    tok.train(
        files,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    return folder / "tokenizer.json"
