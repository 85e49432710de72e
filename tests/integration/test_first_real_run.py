"""docs/first-run.md, run as written: its bash block, at tiny scale, through the real CLI.

The inputs come the way real ones do: a Llama saved by transformers, whose folder holds a
tokenizer.json saved with truncation and padding (as a classifier's tokenizer ships) and a
tokenizer_config.json; a corpus of Python standard-library files. The block ends with
transformers alone (AutoModelForCausalLM + AutoTokenizer) generating the text moeflow did.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[hf]'")

from helpers.timeouts import limit  # noqa: E402
from helpers.tokenizer import EOS, stdlib_package, train_bpe  # noqa: E402
from helpers.upcycle import make_hf  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "first-run.md"


def script() -> str:
    return re.search(r"```bash\n(.*?)\n```", DOC.read_text(), flags=re.S).group(1)


def a_llama_with_its_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer

    file = train_bpe(folder, vocab_size=400, corpus=stdlib_package("json"))
    tok = Tokenizer.from_file(str(file))
    eos = tok.token_to_id(EOS)
    tok.enable_truncation(max_length=64)
    tok.enable_padding(length=64, pad_id=eos, pad_token=EOS)
    tok.save(str(file))
    make_hf(
        "llama", folder, vocab=tok.get_vocab_size(), bos_token_id=eos, eos_token_id=eos, max_position_embeddings=128
    )


def test_the_first_real_run_page_runs_as_written(tmp_path):
    a_llama_with_its_tokenizer(tmp_path / "llama")
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
        "MODEL": str(tmp_path / "llama"),
        "CORPUS": str(stdlib_package("email")),
        "WORK": "work",
        "PROMPT": "def main(",
        "TRAIN": "data.seq_len=32 data.batch_size=4 trainer.steps=12 trainer.eval_every=6 trainer.eval_batches=2 "
        "trainer.ckpt_every=12 trainer.device=cpu trainer.precision=fp32 model.max_seq_len=64",
    }
    run = subprocess.run(
        ["bash", "-c", script()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=limit(600)
    )
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    out = run.stdout
    assert "switched off for pretraining data" in out  # the truncation and padding saved in the tokenizer
    assert "verify moeflow MoE vs dense" in out and "transformers and moeflow generate the same text" in out
    work = tmp_path / "work"
    meta = json.loads((work / "data" / "meta.json").read_text())
    assert meta["documents"] == sum(
        1 for f in stdlib_package("email").rglob("*.py") if f.stat().st_size
    )  # every non-empty file
    # every folder a model lives in carries its tokenizer, by copy
    for d in (work / "data", work / "moe" / "moeflow", work / "run"):
        assert (d / "tokenizer" / "tokenizer.json").is_file(), d
    assert (work / "hf" / "tokenizer.json").is_file()
    exported = json.loads((work / "hf" / "config.json").read_text())
    assert exported["eos_token_id"] == meta["eos_id"]
    # generate works from another folder: nothing in the run refers to a relative path
    (tmp_path / "elsewhere").mkdir()
    again = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeflow.launch.cli",
            "generate",
            str(work / "run"),
            "--prompt",
            "def main(",
            "--max-new-tokens",
            "16",
        ],
        cwd=tmp_path / "elsewhere",
        env=env,
        capture_output=True,
        text=True,
        timeout=limit(120),
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.rstrip("\n") == (work / "moeflow-generate.txt").read_text().rstrip("\n")
