"""`moeflow data prepare`: tokenize a corpus into the token files `data=memmap` trains on.

  moeflow data prepare INPUT [INPUT ...] --tokenizer TOK --out DIR [--field text] [--val-percent 1]
                       [--workers N] [--eos-token TEXT] [--resume]

INPUT: text files or folders of them (`--glob`), JSONL (one JSON object per line, text in
`--field`), Parquet (column `--field`), or a Hugging Face `datasets` folder written by
`save_to_disk` (its Arrow files, read with pyarrow). TOK: a `tokenizer.json` (the `tokenizers`
library) or a model folder (its tokenizer.json, else transformers' `AutoTokenizer`).

DIR gets train.bin and val.bin (each document's ids followed by one EOS: one EOS between
documents; uint16 when the vocab fits, else uint32), meta.json (tokenizer, vocab size,
EOS id, documents and tokens per split), which training checks against `model.vocab_size`,
and tokenizer/ (a copy of the tokenizer as used: runs on the data carry it on).
Documents go to the validation split by a hash of their position, so the split does not
depend on the number of workers. Work is done in chunks of documents, in order, by a pool of
processes; `--resume` continues after the last chunk a killed run finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np

from moeflow.moe.errors import DataError

from .data import TOKEN_META
from .tokenizer_files import TOKENIZER_DIR, make_auto_loadable

STATE = "prepare_state.json"  # progress of an unfinished run (removed when it completes)
CHUNK_DOCS = 512
EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


# --------------------------------------------------------------------------------------
# Inputs: every source is an iterator of documents (str), in a fixed order


def _text_files(path: Path, glob: str) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(f for f in path.glob(glob) if f.is_file())


def _arrow_column(files: list[Path], field: str, what: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.ipc

    for f in files:
        try:
            with pa.memory_map(str(f)) as source:
                try:
                    reader = pa.ipc.open_stream(source)
                except pa.ArrowInvalid:
                    reader = pa.ipc.open_file(source)
                table = reader.read_all()
        except pa.ArrowInvalid as e:
            raise DataError(f"{f} is not a readable Arrow file ({e}); re-save the dataset with save_to_disk") from None
        yield from _column(table, field, what)


def _column(table, field: str, what: str) -> Iterator[str]:
    if field not in table.column_names:
        raise DataError(f"{what} has no column {field!r} (columns: {', '.join(table.column_names)}); pass --field NAME")
    for n, value in enumerate(table.column(field).to_pylist()):
        if value is None:
            continue
        if not isinstance(value, str):
            raise DataError(
                f"{what}: row {n} of column {field!r} holds a {type(value).__name__}, not text; pass --field NAME of a text column"
            )
        yield value


def _jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise DataError(f"{path}:{n} is not a JSON object; JSONL input has one object per line") from None
            if not isinstance(record, dict) or field not in record:
                raise DataError(f"{path}:{n} has no {field!r} field; pass --field NAME (the key holding the text)")
            if not isinstance(record[field], str):
                raise DataError(
                    f"{path}:{n}: {field!r} holds a {type(record[field]).__name__}, not text; pass --field NAME of the key holding the text"
                )
            yield record[field]


def _parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(str(path), columns=None)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise DataError(f"{path} is not a readable Parquet file ({e})") from None
    yield from _column(table, field, str(path))


def documents(inputs: list[Path], field: str, glob: str, skipped: list[Path] | None = None) -> Iterator[str]:
    """All documents of all inputs, in order; binary files met in a folder are left out and listed in
    `skipped` (a binary file named as an input is an error)."""
    for path in inputs:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file()):
            arrows = sorted(path.rglob("*.arrow"))
            if not arrows:
                raise DataError(
                    f"{path} looks like a datasets folder but holds no .arrow files; pass the folder save_to_disk wrote"
                )
            yield from _arrow_column(arrows, field, str(path))
            continue
        for f in _text_files(path, glob):
            if f.suffix == ".jsonl" or f.name.endswith(".jsonl.gz"):
                yield from _jsonl(f, field)
            elif f.suffix == ".parquet":
                yield from _parquet(f, field)
            elif f.suffix == ".arrow":
                yield from _arrow_column([f], field, str(f))
            else:
                data = f.read_bytes()
                if b"\0" not in data[:4096]:
                    if data:
                        yield data.decode("utf-8", errors="replace")
                elif path.is_file():
                    raise DataError(
                        f"{f} is a binary file (NUL bytes), not text, JSONL, Parquet or Arrow; pass text inputs"
                    )
                elif skipped is not None:  # binary files in a folder (e.g. __pycache__) are not documents
                    skipped.append(f)


# --------------------------------------------------------------------------------------
# Tokenizer


class LoadedTokenizer(NamedTuple):
    encode: Callable[[list[str]], list[list[int]]]  # texts -> ids, no special tokens added, never truncated or padded
    vocab: int
    eos: int | None
    description: str
    to_id: Callable[[str], int | None]
    switched_off: list[
        str
    ]  # what the tokenizer file asked for that pretraining data must not have (truncation, padding)
    unk_id: int | None
    special_ids: list[int]
    save: Callable[[Path, int | None], None]  # (folder, eos id): the tokenizer as used here, for the data to carry


def load_tokenizer(spec: str) -> LoadedTokenizer:
    """The tokenizer of a tokenizer.json or a model folder, for pretraining data: a `tokenizer.json`
    may carry the truncation and padding of the task it was saved for (a 128-token classifier's),
    which would cut every document and write pad tokens into the corpus; both are switched off."""
    p = Path(spec).expanduser()
    if not p.exists():
        raise DataError(f"--tokenizer {spec} does not exist; pass a tokenizer.json or a model folder that has one")
    file = p if p.is_file() else p / "tokenizer.json"
    if file.is_file():
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises its own exception type
            raise DataError(f"{file} is not a tokenizer.json the tokenizers library reads ({e})") from None
        off = _switch_off(tok)
        eos = _eos_from_config(file.parent / "tokenizer_config.json", tok.token_to_id)
        if eos is None:
            eos = next((tok.token_to_id(n) for n in EOS_NAMES if tok.token_to_id(n) is not None), None)
        unk = getattr(tok.model, "unk_token", None)
        unk_id = tok.token_to_id(unk) if isinstance(unk, str) else None
        special = sorted(i for i, t in tok.get_added_tokens_decoder().items() if getattr(t, "special", False))

        def save(folder: Path, eos_id: int | None) -> None:
            folder.mkdir(parents=True, exist_ok=True)
            tok.save(str(folder / "tokenizer.json"))  # truncation and padding off, as the data was made
            for name in ("tokenizer_config.json", "special_tokens_map.json"):
                if (file.parent / name).is_file():
                    shutil.copy2(file.parent / name, folder / name)
            make_auto_loadable(folder, tok.id_to_token(eos_id) if eos_id is not None else None)

        return LoadedTokenizer(
            (lambda texts: [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]),
            tok.get_vocab_size(with_added_tokens=True),
            eos,
            str(file.resolve()),
            tok.token_to_id,
            off,
            unk_id,
            special,
            save,
        )
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise DataError(
            f"{p} has no tokenizer.json; install transformers (pip install 'moeflow[hf]') to load other tokenizers"
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"transformers cannot load a tokenizer from {p}: {' '.join(str(e).split())[:200]}") from None
    off = _switch_off(tok._tokenizer) if getattr(tok, "_tokenizer", None) is not None else []
    tok.model_max_length = int(1e30)  # documents are any length here (no "longer than the maximum" warnings)

    def to_id(token):
        i = tok.convert_tokens_to_ids(token)
        return None if i is None or i == tok.unk_token_id and token != tok.unk_token else i

    def save(folder: Path, eos_id: int | None) -> None:
        tok.save_pretrained(str(folder))

    return LoadedTokenizer(
        (lambda texts: tok(texts, add_special_tokens=False, truncation=False, padding=False)["input_ids"]),
        len(tok),
        tok.eos_token_id,
        str(p.resolve()),
        to_id,
        off,
        tok.unk_token_id,
        sorted(set(tok.all_special_ids)),
        save,
    )


def _switch_off(tok) -> list[str]:
    """Turn off a tokenizers.Tokenizer's saved truncation and padding; what was on, in words."""
    off = []
    if tok.truncation:
        off.append(f"truncation to {tok.truncation.get('max_length')} tokens")
        tok.no_truncation()
    if tok.padding:
        off.append(
            f"padding{' to ' + str(tok.padding.get('length')) if tok.padding.get('length') else ''} with {tok.padding.get('pad_token')!r}"
        )
        tok.no_padding()
    return off


def _eos_from_config(config: Path, to_id) -> int | None:
    if not config.is_file():
        return None
    try:
        eos = json.loads(config.read_text()).get("eos_token")
    except ValueError:
        return None
    if isinstance(eos, dict):
        eos = eos.get("content")
    return to_id(eos) if isinstance(eos, str) else None


# --------------------------------------------------------------------------------------
# The run: chunks of documents through a process pool, appended in order

_worker_encode = None


def _init_worker(spec: str) -> None:
    global _worker_encode
    _worker_encode = load_tokenizer(spec)[0]


def _encode_chunk(job: tuple[int, list[str]]) -> tuple[int, list[list[int]]]:
    first, texts = job
    return first, _worker_encode(texts)


def is_val(doc_index: int, val_percent: float) -> bool:
    return zlib.crc32(doc_index.to_bytes(8, "little")) % 10000 < val_percent * 100


def _chunks(docs: Iterator[str], skip: int) -> Iterator[tuple[int, list[str]]]:
    batch, first = [], 0
    for i, doc in enumerate(docs):
        if i < skip:
            continue
        if not batch:
            first = i
        batch.append(doc)
        if len(batch) == CHUNK_DOCS:
            yield first, batch
            batch = []
    if batch:
        yield first, batch


def prepare(args: argparse.Namespace) -> dict:
    inputs = [Path(i).expanduser() for i in args.inputs]
    missing = [str(i) for i in inputs if not i.exists()]
    if missing:
        raise DataError(f"input {missing[0]} does not exist; pass existing files or folders")
    if not 0 <= args.val_percent < 100:
        raise DataError(f"--val-percent={args.val_percent} must be in [0, 100)")
    loaded = load_tokenizer(args.tokenizer)
    encode, vocab, eos, desc, to_id = loaded[:5]
    if loaded.switched_off:
        print(
            f"{desc} was saved with {' and '.join(loaded.switched_off)}: switched off for pretraining data (every document whole, no pad tokens)"
        )
    if args.eos_token is not None:
        eos = to_id(args.eos_token)
        if eos is None:
            raise DataError(f"--eos-token {args.eos_token!r} is not a token of {desc}")
    if eos is None:
        raise DataError(f"{desc} names no end-of-text token; pass --eos-token TEXT (e.g. '<|endoftext|>')")
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    out = Path(args.out).expanduser()
    state_file = out / STATE
    state = {"docs": 0, "train": {"tokens": 0, "documents": 0}, "val": {"tokens": 0, "documents": 0}}
    ours = [out / n for n in (TOKEN_META, STATE, "train.bin", "val.bin", TOKENIZER_DIR) if (out / n).exists()]
    if args.resume and state_file.is_file():
        state = json.loads(state_file.read_text())
    elif ours and args.force:
        for p in ours:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        print(f"--force: removed {', '.join(p.name for p in ours)} from {out}")
    elif ours:
        resumable = " pass --resume to continue the unfinished run there," if state_file.exists() else ""
        raise DataError(
            f"{out} already holds {', '.join(p.name for p in ours)};{resumable} pass --force to replace them, or choose a new --out"
        )
    state.setdefault("unk", 0)
    state.setdefault("special", 0)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".moeflow-write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise DataError(f"cannot write into --out {out} ({e.strerror or e}); choose a writable folder") from None
    files = {}
    for split in ("train", "val"):  # drop whatever a killed run wrote after its last recorded chunk
        f = open(out / f"{split}.bin", "ab")
        f.truncate(state[split]["tokens"] * np.dtype(dtype).itemsize)
        f.seek(0, os.SEEK_END)
        files[split] = f

    from multiprocessing import get_context

    from tqdm import tqdm

    progress = tqdm(desc="tokenizing", unit=" docs", initial=state["docs"], disable=not args.progress)
    workers = max(1, args.workers)
    pool = (
        get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(args.tokenizer,))
        if workers > 1
        else None
    )
    skipped: list[Path] = []
    jobs = _chunks(documents(inputs, args.field, args.glob, skipped), state["docs"])
    results = pool.imap(_encode_chunk, jobs) if pool else ((first, encode(texts)) for first, texts in jobs)
    special = np.asarray(loaded.special_ids, dtype=np.int64)
    try:
        for first, encoded in results:
            for split in ("train", "val"):
                ids = [
                    doc + [eos]
                    for i, doc in enumerate(encoded, first)
                    if is_val(i, args.val_percent) == (split == "val")
                ]
                if not ids:
                    continue
                flat = np.fromiter((t for doc in ids for t in doc), dtype=np.int64)
                if flat.size and (flat.max() >= vocab or flat.min() < 0):
                    raise DataError(f"the tokenizer produced id {int(flat.max())} outside its vocab of {vocab}")
                # unknown and special tokens inside the documents: the EOS appended to each is not counted
                if loaded.unk_id is not None:
                    state["unk"] += int((flat == loaded.unk_id).sum()) - (len(ids) if eos == loaded.unk_id else 0)
                if special.size:
                    state["special"] += int(np.isin(flat, special).sum()) - (
                        len(ids) if eos in loaded.special_ids else 0
                    )
                files[split].write(flat.astype(dtype).tobytes())
                files[split].flush()
                state[split]["tokens"] += int(flat.size)
                state[split]["documents"] += len(ids)
            state["docs"] = first + len(encoded)
            state_file.write_text(json.dumps(state))
            progress.update(len(encoded))
    finally:
        progress.close()
        for f in files.values():
            f.close()
        if pool:
            pool.terminate()
    if state["train"]["tokens"] == 0:
        read = state["train"]["documents"] + state["val"]["documents"]
        why = (
            f"--glob {args.glob!r} matched no non-empty file in the input folders, or --field {args.field!r} held no text"
            if read == 0
            else f"all {read} documents went to validation (--val-percent {args.val_percent})"
        )
        raise DataError(
            f"no documents reached the training split (inputs: {', '.join(map(str, inputs))}): {why}; check the inputs"
        )
    docs = state["train"]["documents"] + state["val"]["documents"]
    text_tokens = state["train"]["tokens"] + state["val"]["tokens"] - docs  # less the EOS after each document
    meta = {
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab,
        "eos_id": eos,
        "tokenizer": desc,
        "train": state["train"],
        "val": state["val"],
        "val_file": "val.bin" if state["val"]["tokens"] else None,
        "inputs": [str(i) for i in inputs],
        "val_percent": args.val_percent,
        "documents": docs,
        "tokens_per_document": text_tokens / max(docs, 1),
        "unk_rate": state["unk"] / max(text_tokens, 1),
        "special_token_rate": state["special"] / max(text_tokens, 1),
        "tokenizer_switched_off": loaded.switched_off,
    }
    if skipped:
        meta["skipped_binary_files"] = len(skipped)
        print(f"left out {len(skipped)} binary files of the input folders (e.g. {skipped[0]})")
    loaded.save(
        out / TOKENIZER_DIR, eos
    )  # the data carries its tokenizer: runs on it, their exports and generate use this copy
    meta["tokenizer_dir"] = TOKENIZER_DIR
    (out / TOKEN_META).write_text(json.dumps(meta, indent=2) + "\n")
    state_file.unlink()
    print(
        f"wrote {out}: {state['train']['documents']} documents / {state['train']['tokens']} tokens for training, "
        f"{state['val']['documents']} / {state['val']['tokens']} for validation ({meta['dtype']}, vocab {vocab}); "
        f"{meta['tokens_per_document']:.1f} tokens per document, unknown tokens {100 * meta['unk_rate']:.3f}%, "
        f"special tokens inside documents {100 * meta['special_token_rate']:.3f}%"
    )
    print(f"train on it with: moeflow train data=memmap data.path={out / 'train.bin'} model.vocab_size={vocab}")
    return meta


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(
        prog="moeflow data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="action", required=True)
    p = sub.add_parser("prepare", help="tokenize text / JSONL / Parquet / datasets folders into token files")
    p.add_argument("inputs", nargs="+", help="files or folders")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, or a model folder")
    p.add_argument("--out", required=True, help="output folder (train.bin, val.bin, meta.json)")
    p.add_argument(
        "--field", default="text", help="JSONL key / Parquet or Arrow column holding the text (default: text)"
    )
    p.add_argument("--glob", default="**/*", help="files to read inside folders (default: all)")
    p.add_argument("--val-percent", type=float, default=1.0, help="percent of documents for validation (default 1)")
    p.add_argument("--force", action="store_true", help="replace the prepared data already in --out")
    p.add_argument("--eos-token", default=None, help="end-of-text token (default: the tokenizer's)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizing processes")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    prepare(args)
