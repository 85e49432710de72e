"""Token streams for training: the stdlib's own source (default), user text, or a memmap.

Text is byte-level (vocab 256). Batches are random windows drawn from a generator seeded
by (seed, step, micro-batch, rank), so a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moeflow.moe.errors import DataError


@dataclass
class TokenSplits:
    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    description: str
    counts: tuple[int, int] | None = None  # (train, val) tokens where the arrays are not held here (data.mix)

    @property
    def token_counts(self) -> tuple[int, int]:
        return self.counts if self.counts is not None else (len(self.train), len(self.val))


def _split_files_by_hash(files: list[Path], root: Path, val_percent: float, max_bytes: int | None):
    train, val, total = [], [], 0
    for f in files:
        data = f.read_bytes()
        if not data:
            continue
        bucket = zlib.crc32(str(f.relative_to(root)).encode()) % 100
        (val if bucket < val_percent else train).append(data)
        total += len(data)
        if max_bytes and total >= max_bytes:
            break
    return train, val


def _bytes_to_tokens(chunks: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"\n".join(chunks), dtype=np.uint8).copy()


def load_text_files(root: Path, files: list[Path], val_percent: float, max_bytes: int | None, what: str) -> TokenSplits:
    train, val = _split_files_by_hash(sorted(files), root, val_percent, max_bytes)
    if not train and not val:
        raise DataError(f"{what} holds no text (all files empty); point data.path at non-empty text files")
    if not val or not train:  # too few files to split by file: split the bytes instead
        data = _bytes_to_tokens(train + val)
        cut = int(len(data) * (1 - max(val_percent, 1) / 100))
        return TokenSplits(data[:cut], data[cut:], 256, what)
    return TokenSplits(_bytes_to_tokens(train), _bytes_to_tokens(val), 256, what)


def load_stdlib(val_percent: float, max_bytes: int | None) -> TokenSplits:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file()]
    if not files:
        raise DataError(f"no Python sources found under {root}; use data=text data.path=... instead")
    return load_text_files(root, files, val_percent, max_bytes, f"Python stdlib source at {root}")


def load_text(path: str, glob: str, val_percent: float, max_bytes: int | None) -> TokenSplits:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path={path} does not exist; pass an existing text file or folder")
    if p.is_file():
        return load_text_files(p.parent, [p], val_percent, max_bytes, f"text file {p}")
    files = [f for f in p.glob(glob) if f.is_file()]
    if not files:
        raise DataError(f"data.path={path} has no files matching data.glob={glob!r}; change data.glob or the folder")
    return load_text_files(p, files, val_percent, max_bytes, f"{len(files)} text files under {p}")


TOKEN_META = "meta.json"  # beside a prepared token file (`moeflow data prepare`): dtype, vocab, tokenizer, counts


def token_file_meta(path: Path) -> dict | None:
    """The metadata `moeflow data prepare` writes beside its token files, if there is any."""
    meta = Path(path).parent / TOKEN_META
    if not meta.is_file():
        return None
    try:
        found = json.loads(meta.read_text())
    except ValueError:
        raise DataError(f"{meta} is not valid JSON; prepare the data again (moeflow data prepare)") from None
    return found if isinstance(found, dict) and "dtype" in found else None


def _looks_like_text(p: Path) -> bool:
    head = p.read_bytes()[:4096] if p.stat().st_size < 2**20 else open(p, "rb").read(4096)
    printable = sum(32 <= b < 127 or b in (9, 10, 13) for b in head)
    return len(head) > 0 and printable / len(head) > 0.95


def load_memmap(path: str, val_path: str | None, dtype: str | None, val_percent: float) -> TokenSplits:
    """dtype None: the one the data's meta.json records (uint16 for bare token files)."""
    meta = token_file_meta(Path(path))
    if dtype is None:
        dtype = meta["dtype"] if meta is not None else "uint16"
    if dtype not in ("uint16", "uint32"):
        raise DataError(f"data.dtype={dtype} is not supported; use uint16 or uint32")
    if meta is not None and meta["dtype"] != dtype:
        raise DataError(
            f"{path} holds {meta['dtype']} tokens (its {TOKEN_META}) but data.dtype={dtype}; set data.dtype={meta['dtype']}"
        )
    itemsize = np.dtype(dtype).itemsize

    def open_bin(p: str) -> np.ndarray:
        if not Path(p).is_file():
            raise DataError(f"{p} does not exist; pass a pre-tokenized .bin file")
        size = Path(p).stat().st_size
        if size < itemsize * 2:
            raise DataError(f"{p} is empty; pass a pre-tokenized .bin file with tokens in it")
        if meta is None and _looks_like_text(Path(p)):
            raise DataError(
                f"{p} looks like text, not a token file; tokenize it first (moeflow data prepare) or train on it as bytes with data=text"
            )
        if size % itemsize:
            raise DataError(
                f"{p} is {size} bytes, not a whole number of {dtype} tokens ({itemsize} bytes each): a truncated file, or the wrong data.dtype"
            )
        return np.memmap(p, dtype=dtype, mode="r")

    train = open_bin(path)
    own_val = None
    if not val_path and meta is not None and meta.get("val_file"):  # a prepared set's own split by document
        own_val = inside_folder(Path(path).parent, meta["val_file"], f"{TOKEN_META}'s val_file")
        val_path = str(own_val)
    if meta is not None:  # the counts meta.json records: a file of another dtype or another preparation is refused
        check_count(Path(path), train, meta.get("train"), dtype)
        if own_val is not None:
            check_count(own_val, None, meta.get("val"), dtype)
    if val_path:
        val = open_bin(val_path)
    else:
        cut = int(len(train) * (1 - val_percent / 100))
        train, val = train[:cut], train[cut:]
    if meta and "vocab_size" in meta:
        vocab = int(meta["vocab_size"])
        for split, tokens in (("train", train), ("val", val)):
            top = sampled_max(tokens)
            if top >= vocab:
                raise DataError(
                    f"{path if split == 'train' else val_path} holds token id {top}, outside the vocabulary of {vocab} its {TOKEN_META} "
                    f"declares: the file and its metadata do not belong together (another tokenizer or dtype); prepare the data again"
                )
    else:
        vocab = int(max(train.max(initial=0), val.max(initial=0))) + 1
    return TokenSplits(train, val, vocab, f"memmap {path} ({dtype})")


def inside_folder(folder: Path, name: str, what: str) -> Path:
    """`folder/name`, refused unless it stays inside `folder` (a metadata file is data from elsewhere)."""
    if not isinstance(name, str) or not name:
        raise DataError(f"{folder}: {what} is not a file name; prepare the data again")
    target = (folder / name).resolve()
    if folder.resolve() not in target.parents:
        raise DataError(
            f"{folder}: {what} {name!r} points outside its folder; a prepared set's files sit beside its {TOKEN_META}"
        )
    return target


def check_count(path: Path, tokens: np.ndarray | None, recorded, dtype: str) -> None:
    """The file holds exactly the tokens its meta.json counted (catches a uint32 file labelled uint16)."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("tokens"), int):
        return
    size = Path(path).stat().st_size if path.is_file() else None
    itemsize = np.dtype(dtype).itemsize
    if size is not None and size != recorded["tokens"] * itemsize:
        raise DataError(
            f"{path} is {size} bytes but its {TOKEN_META} counts {recorded['tokens']} {dtype} tokens ({recorded['tokens'] * itemsize} bytes): "
            f"the file is truncated, of another dtype, or from another preparation; prepare the data again"
        )


SAMPLE_WINDOWS, SAMPLE_TOKENS = 64, 65536


def sampled_max(tokens: np.ndarray) -> int:
    """The largest id in evenly spread windows of the file (64 x 64k tokens: a whole small file; a
    large one without reading it all): wrong ids show up everywhere in a mislabelled file."""
    n = len(tokens)
    if n <= SAMPLE_WINDOWS * SAMPLE_TOKENS:
        return int(tokens.max(initial=0))
    starts = np.linspace(0, n - SAMPLE_TOKENS, SAMPLE_WINDOWS).astype(np.int64)
    return int(max(tokens[s : s + SAMPLE_TOKENS].max() for s in starts))


def load_splits(data_cfg) -> TokenSplits:
    src = data_cfg.source
    if src == "stdlib":
        return load_stdlib(data_cfg.val_percent, data_cfg.get("max_bytes"))
    if src == "text":
        return load_text(data_cfg.path, data_cfg.glob, data_cfg.val_percent, data_cfg.max_bytes)
    if src == "memmap":
        return load_memmap(data_cfg.path, data_cfg.get("val_path"), data_cfg.dtype, data_cfg.val_percent)
    raise DataError(f"data.source={src!r} is unknown; use data=stdlib, data=text or data=memmap")


class BatchSampler:
    """Random (x, y) windows of length seq_len from a flat token array, deterministic per key.

    The windows of one (step, micro-batch) are drawn for the whole data-parallel batch at once
    and each rank takes its consecutive slice: the global batch is the same however it is split
    (4 ranks x 2 sequences, 2 x 4, 1 x 8), so a run resumed on another number of ranks with the
    same global batch sees the batches an uninterrupted run would have seen."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        if len(tokens) <= seq_len + 1:
            raise DataError(
                f"the split has {len(tokens)} tokens, fewer than data.seq_len+2={seq_len + 2}; use more data or a shorter seq_len"
            )
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed

    def batch(
        self, step: int, micro: int, rank: int = 0, ranks: int = 1, attempt: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's `batch_size` windows of the (step, micro-batch) global batch of `batch_size * ranks`
        (`attempt` > 0: other windows, after a rollback past a divergence)."""
        rng = np.random.default_rng([self.seed, step, micro] + ([attempt] if attempt else []))
        starts = rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size * ranks)
        starts = starts[rank * self.batch_size : (rank + 1) * self.batch_size]
        window = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(window)
        return t[:, :-1], t[:, 1:]


class MixtureSampler:
    """Windows from several token sets, each sequence's set drawn with the mixing weights.

    Like `BatchSampler`, the whole data-parallel batch is drawn at once from (seed, step, micro)
    and each rank takes its slice, so the mixture is the same however the batch is split."""

    def __init__(self, samplers: list[BatchSampler], weights: list[float], seed: int):
        self.samplers, self.seed = samplers, seed
        self.p = np.asarray(weights, dtype=np.float64) / sum(weights)
        self.seq_len, self.batch_size = samplers[0].seq_len, samplers[0].batch_size

    def batch(
        self, step: int, micro: int, rank: int = 0, ranks: int = 1, attempt: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step, micro, 2**31 - 1] + ([attempt] if attempt else []))
        n = self.batch_size * ranks
        source = rng.choice(len(self.samplers), size=n, p=self.p)
        position = rng.random(n)
        rows = []
        for j in range(rank * self.batch_size, (rank + 1) * self.batch_size):
            tokens = self.samplers[source[j]].tokens
            start = int(position[j] * (len(tokens) - self.seq_len - 1))
            rows.append(np.asarray(tokens[start : start + self.seq_len + 1], dtype=np.int64))
        t = torch.from_numpy(np.stack(rows))
        return t[:, :-1], t[:, 1:]


def mixture_splits(data_cfg) -> tuple[list[TokenSplits], list[float]]:
    """The prepared sets of `data.mix` ([{path, weight}, ...]); each must come from `moeflow data prepare`
    with the same tokenizer, so that one id means one token everywhere."""
    sets, weights, tokenizers = [], [], set()
    for i, entry in enumerate(data_cfg.mix):
        path, weight = entry.get("path"), entry.get("weight", 1.0)
        if not path or not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
            raise DataError(f"data.mix[{i}] must be {{path: .../train.bin, weight: > 0}}, got {dict(entry)}")
        meta = token_file_meta(Path(path))
        if meta is None:
            raise DataError(
                f"data.mix[{i}].path={path} has no {TOKEN_META} beside it; prepare the set with `moeflow data prepare`"
            )
        tokenizers.add((meta.get("tokenizer_id") or meta.get("tokenizer"), meta.get("vocab_size")))
        sets.append(load_memmap(path, None, meta["dtype"], data_cfg.val_percent))
        weights.append(float(weight))
    if len({vocab for _, vocab in tokenizers}) > 1:
        raise DataError(
            f"the data.mix sets were tokenized with different vocabularies ({sorted(v for _, v in tokenizers)}); prepare them with one tokenizer"
        )
    return sets, weights


def training_samplers(data_cfg, vocab_size: int, seed: int):
    """Load the splits and build the train/val samplers every training loop uses."""
    if data_cfg.get("mix"):
        sets, weights = mixture_splits(data_cfg)
        biggest = max(s.vocab_size for s in sets)
        if biggest > vocab_size:
            raise DataError(
                f"the data has token ids up to {biggest - 1} but model.vocab_size={vocab_size}; raise model.vocab_size"
            )
        make = lambda split: MixtureSampler(
            [BatchSampler(getattr(s, split), data_cfg.seq_len, data_cfg.batch_size, seed) for s in sets], weights, seed
        )  # noqa: E731
        description = "mixture of " + ", ".join(f"{s.description} x{w:g}" for s, w in zip(sets, weights))
        train, val = make("train"), make("val")
        empty = np.empty(0, dtype=np.uint16)  # the sets stay in their own files; only the counts are summed
        counts = (sum(len(s.train) for s in sets), sum(len(s.val) for s in sets))
        return TokenSplits(empty, empty, biggest, description, counts), train, val
    splits = load_splits(data_cfg)
    if splits.vocab_size > vocab_size:
        raise DataError(
            f"the data has token ids up to {splits.vocab_size - 1} but model.vocab_size={vocab_size}; raise model.vocab_size"
        )
    train = BatchSampler(splits.train, data_cfg.seq_len, data_cfg.batch_size, seed)
    val = BatchSampler(splits.val, data_cfg.seq_len, data_cfg.batch_size, seed)
    return splits, train, val
