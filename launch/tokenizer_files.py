"""A model's tokenizer travels with it, copied in, never referenced by path.

Prepared data keeps a copy in `<data>/tokenizer/` (switched-off truncation and padding
included), a run copies its data's or its starting checkpoint's into `<run dir>/tokenizer/`,
imports and upcycles copy the source's, and exports copy the run's with the special-token ids
in config.json, so that `AutoTokenizer.from_pretrained(export)` loads it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moeflow.moe.hf_convert import TOKENIZER_FILES

TOKENIZER_DIR = "tokenizer"
SPECIAL = ("bos", "eos", "pad", "unk")


def copy_tokenizer(src: Path, dst: Path) -> bool:
    """The tokenizer files of folder `src` into `dst` (created); whether there were any."""
    names = [n for n in TOKENIZER_FILES if (Path(src) / n).is_file()]
    if not names:
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy2(Path(src) / n, dst / n)
    return True


def checkpoint_tokenizer(found: Path) -> Path | None:
    """The tokenizer folder beside a checkpoint: its run dir's (or model folder's), if any."""
    for d in (found.parent.parent / TOKENIZER_DIR, found.parent / TOKENIZER_DIR, found / TOKENIZER_DIR):
        if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file():
            return d
    return None


def data_tokenizer(data_cfg) -> Path | None:
    """The tokenizer a prepared token file was made with: the copy in its folder (older preparations:
    the path their meta.json names, if it is still there)."""
    from .data import token_file_meta

    if data_cfg.get("source") != "memmap" or not data_cfg.get("path"):
        return None
    folder = Path(str(data_cfg.path)).expanduser().parent
    if (folder / TOKENIZER_DIR / "tokenizer.json").is_file() or (
        folder / TOKENIZER_DIR / "tokenizer_config.json"
    ).is_file():
        return folder / TOKENIZER_DIR
    meta = token_file_meta(Path(str(data_cfg.path)).expanduser()) or {}
    old = Path(str(meta.get("tokenizer") or "")).expanduser()
    if meta.get("tokenizer") and old.exists():
        return old.parent if old.is_file() else old
    return None


def carry_into_run(run_dir: Path, starting_checkpoint: Path | None, data_cfg) -> Path | None:
    """Copy the run's tokenizer into `run_dir/tokenizer` (once): its prepared data's, else its starting
    checkpoint's; where it came from, None when there is none (byte-level data) or it is there already."""
    dst = Path(run_dir) / TOKENIZER_DIR
    if dst.exists():
        return None
    for src in (data_tokenizer(data_cfg), checkpoint_tokenizer(starting_checkpoint) if starting_checkpoint else None):
        if src is not None and copy_tokenizer(src, dst):
            return src
    return None


def special_tokens(folder: Path) -> dict[str, tuple[str, int]]:
    """{'eos': (token, id), ...} of a tokenizer folder, from tokenizer_config.json / special_tokens_map.json
    (names) and tokenizer.json (ids)."""
    names: dict[str, str] = {}
    for f in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            body = json.loads((folder / f).read_text()) if (folder / f).is_file() else {}
        except ValueError:
            continue
        for s in SPECIAL:
            v = body.get(f"{s}_token")
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                names.setdefault(s, v)
    if not (folder / "tokenizer.json").is_file():
        return {}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return {s: (t, tok.token_to_id(t)) for s, t in names.items() if tok.token_to_id(t) is not None}


def make_auto_loadable(folder: Path, eos_token: str | None = None) -> dict[str, int]:
    """A tokenizer folder that has only tokenizer.json (what `data prepare` saves from a bare file)
    gets a tokenizer_config.json naming the fast tokenizer class and its special tokens, so that
    transformers' AutoTokenizer loads it; the special-token ids, for config.json."""
    config = folder / "tokenizer_config.json"
    found = special_tokens(folder)
    if eos_token is not None and "eos" not in found:
        from tokenizers import Tokenizer

        i = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(eos_token)
        if i is not None:
            found["eos"] = (eos_token, i)
    if (folder / "tokenizer.json").is_file():
        body = json.loads(config.read_text()) if config.is_file() else {}
        if "tokenizer_class" not in body:
            body.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
            for s, (token, _) in found.items():
                body.setdefault(f"{s}_token", token)
            config.write_text(json.dumps(body, indent=2) + "\n")
    return {f"{s}_token_id": i for s, (_, i) in found.items() if s != "unk"}


def check_data_matches_model(data_cfg, resume, run_dir: Path) -> None:
    """Data tokenized with another tokenizer than the model carries trains on ids that mean other tokens:
    refuse before any work, naming the fix (a newcomer got "raise model.vocab_size", or nothing at all
    when the foreign vocabulary was smaller)."""
    from moeflow.moe.errors import ConfigError

    from . import checkpoint as ckpt

    data_tok = data_tokenizer(data_cfg)
    if data_tok is None or resume is None:
        return
    start = ckpt.find_checkpoint(Path(run_dir) if resume == "auto" else Path(str(resume)).expanduser())
    model_tok = checkpoint_tokenizer(start) if start is not None else None
    files = [d / "tokenizer.json" for d in (data_tok, model_tok) if d is not None]
    if model_tok is None or not all(f.is_file() for f in files):
        return
    from tokenizers import Tokenizer

    data_vocab, model_vocab = (Tokenizer.from_file(str(f)).get_vocab(with_added_tokens=True) for f in files)
    if data_vocab != model_vocab:
        raise ConfigError(
            f"data.path={data_cfg.path} was tokenized with another tokenizer ({len(data_vocab)} tokens) than the model carries "
            f"({model_tok}, {len(model_vocab)} tokens): its ids would mean other tokens; prepare the data with the model's "
            f"tokenizer (moeflow data prepare ... --tokenizer {model_tok})"
        )
