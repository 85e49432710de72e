"""`moeflow generate` and `moeflow eval`: look at what a trained (or imported) model does.

  moeflow generate RUN_OR_CKPT --prompt TEXT [--max-new-tokens 64] [--temperature 0 | --top-p 0.9] [--seed 0]
  moeflow eval     RUN_OR_CKPT --data TOKENS.bin|TEXT [--max-tokens N] [--seq-len N] [--batch-size 8]

The tokenizer comes with the model: the `tokenizer/` folder a run, an import or an upcycle
carries (launch/tokenizer_files.py), bytes for runs on text (data=stdlib / data=text);
`--tokenizer` overrides. A tokenizer whose vocabulary does not fit the model's is refused. Greedy decoding at temperature 0, nucleus
sampling otherwise, with a KV cache (`moeflow.moe.model.KVCache`). `eval` reports the loss,
bits per byte (byte-level) or perplexity (tokens), and each MoE layer's expert load on the data.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from moeflow.moe.errors import CheckpointError, DataError


def load_model(src: str, trust: bool = False):
    """The model of a run dir or checkpoint (float32, eval mode) and the checkpoint's meta;
    `trust`: also the pickle-based format of earlier versions."""
    from moeflow.moe.config import ModelConfig
    from moeflow.moe.hf_moe import build_from_state

    from . import checkpoint as ckpt

    found = ckpt.find_checkpoint(src)
    if found is None:
        raise CheckpointError(f"{src}: no moeflow checkpoint there; pass a run dir or a checkpoints/step_* dir")
    meta = ckpt.read_meta(found)
    cfg = {**meta["model"], "experts_impl": "torch"}
    return build_from_state(ModelConfig(**cfg), ckpt.load_full_weights(found, trust=trust)), meta, found


class ByteTokenizer:
    """The byte-level vocabulary of runs on text (ids 0-255)."""

    description = "bytes (UTF-8)"
    eos_id = None
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        file = path if path.is_file() else path / "tokenizer.json"
        if not file.is_file():
            raise DataError(
                f"{path} has no tokenizer.json; pass --tokenizer PATH (a tokenizer.json or a folder with one)"
            )
        try:
            self.tok = Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises its own exception type for a file it cannot parse
            raise DataError(
                f"{file} is not a tokenizer.json the tokenizers library reads ({str(e)[:120]}); pass --tokenizer PATH of one"
            ) from None
        self.description = str(file)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        from .data_prepare import load_tokenizer

        self.eos_id = load_tokenizer(str(file))[2]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def tokenizer_for(meta: dict, found: Path, override: str | None):
    """The run's own tokenizer (see the module docstring), or `override`."""
    from .tokenizer_files import checkpoint_tokenizer, data_tokenizer

    if override:
        return HFTokenizer(Path(override).expanduser())
    if checkpoint_tokenizer(found) is not None:
        return HFTokenizer(checkpoint_tokenizer(found))
    data = (meta.get("config") or {}).get("data") or {}
    if data.get("source") in ("stdlib", "text") and not meta.get(
        "weights_only"
    ):  # an import's config names the default data
        return ByteTokenizer()
    if data_tokenizer(data) is not None:  # runs from before runs carried their tokenizer
        return HFTokenizer(data_tokenizer(data))
    raise DataError(
        "this model carries no tokenizer (no tokenizer/ folder beside its checkpoint, no prepared data that has one); pass --tokenizer PATH"
    )


def check_vocab(tok, vocab_size: int) -> None:
    """A tokenizer that does not belong to the model decodes nonsense: one line instead.
    (Models often pad their vocabulary past the tokenizer's, so only a clear misfit is refused.)"""
    if tok.vocab_size > vocab_size or vocab_size > 2 * tok.vocab_size + 64:
        raise DataError(
            f"the tokenizer ({tok.description}) has {tok.vocab_size} tokens but the model's vocabulary is {vocab_size}: they do not "
            f"belong together; pass the model's own --tokenizer PATH"
        )


def sample_next(logits_V, temperature: float, top_p: float, generator):
    """Greedy at temperature 0; else the smallest set of tokens with probability >= top_p."""
    import torch

    if temperature <= 0:
        return int(logits_V.argmax())
    probs = torch.softmax(logits_V.double() / temperature, -1)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p  # the top token always stays
    sorted_p = torch.where(keep, sorted_p, 0)
    return int(order[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)])


def generate_ids(
    model,
    prompt: list[int],
    max_new: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[int]:
    """New token ids after `prompt`, one forward per token through the KV cache."""
    import torch

    from moeflow.moe.model import KVCache

    room = model.cfg.max_seq_len - len(prompt)
    if room <= 0:
        raise DataError(
            f"the prompt is {len(prompt)} tokens, no room left in model.max_seq_len={model.cfg.max_seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    cache, out = KVCache(), []
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), cache)[0, -1]
        for _ in range(min(max_new, room)):
            nxt = sample_next(logits, temperature, top_p, gen)
            out.append(nxt)
            if nxt == eos_id or cache.length >= model.cfg.max_seq_len:
                break
            logits = model(torch.tensor([[nxt]]), cache)[0, -1]
    return out


def check_sampling(args) -> None:
    """--max-new-tokens, --temperature and --top-p in range, before the model is loaded."""
    if args.max_new_tokens < 0:
        raise DataError(f"--max-new-tokens={args.max_new_tokens}: it takes 0 or more")
    if args.temperature < 0:
        raise DataError(f"--temperature={args.temperature}: it takes 0 (greedy) or more")
    if not 0 < args.top_p <= 1:
        raise DataError(f"--top-p={args.top_p}: it takes a probability mass in (0, 1]")


def generate(args) -> str:
    check_sampling(args)
    model, meta, found = load_model(args.src, trust=getattr(args, "trust_checkpoint", False))
    tok = tokenizer_for(meta, found, args.tokenizer)
    check_vocab(tok, model.cfg.vocab_size)
    prompt = tok.encode(args.prompt)
    if not prompt:
        raise DataError("--prompt is empty; give the text to continue")
    if max(prompt) >= model.cfg.vocab_size:
        raise DataError(
            f"the tokenizer ({tok.description}) gives id {max(prompt)} but model.vocab_size={model.cfg.vocab_size}; pass the model's own --tokenizer"
        )
    ids = generate_ids(model, prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed, tok.eos_id)
    text = tok.decode(ids)
    print(args.prompt + text)
    return text


def evaluate(args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from .data import _looks_like_text, check_count, token_file_meta

    for flag, value in (
        ("--batches", getattr(args, "batches", None)),
        ("--batch-size", args.batch_size),
        ("--max-tokens", getattr(args, "max_tokens", None)),
    ):
        if value is not None and value < 1:
            raise DataError(f"{flag}={value}: it takes a positive integer")
    if not Path(args.data).expanduser().is_file():  # before the model is loaded
        raise DataError(
            f"--data {args.data} does not exist; pass a token file (train.bin / val.bin of moeflow data prepare)"
        )
    model, meta, found = load_model(args.src, trust=getattr(args, "trust_checkpoint", False))
    if args.seq_len is not None and not 1 <= args.seq_len <= model.cfg.max_seq_len:
        raise DataError(
            f"--seq-len={args.seq_len}: this model takes 1 to model.max_seq_len={model.cfg.max_seq_len} tokens per sequence"
        )
    path = Path(args.data).expanduser()
    prepared = token_file_meta(path)
    vocab = model.cfg.vocab_size
    trained_on_bytes = ((meta.get("config") or {}).get("data") or {}).get("source") in (
        "stdlib",
        "text",
    ) and not meta.get("weights_only")
    if trained_on_bytes and prepared:
        raise DataError(
            f"this run was trained on the bytes of text (data={meta['config']['data']['source']}), but {path} holds ids of the tokenizer "
            f"{prepared.get('tokenizer')}; evaluate it on a text file (--data notes.txt), read as bytes"
        )
    if trained_on_bytes and path.suffix != ".bin" and _looks_like_text(path):
        tokens = np.fromfile(path, dtype=np.uint8)  # a byte-level run reads text as its UTF-8 bytes
    else:
        dtype = (prepared or {}).get("dtype") or args.dtype
        if prepared:  # the file holds the tokens its meta.json counted, of its dtype
            split = {"train.bin": "train", str(prepared.get("val_file")): "val"}.get(path.name)
            if split:
                check_count(path, None, prepared.get(split), dtype)
        tokens = np.memmap(path, dtype=dtype, mode="r")
    if (prepared or {}).get("vocab_size", 0) > vocab:
        raise DataError(
            f"{path} was tokenized with a vocab of {prepared['vocab_size']} but model.vocab_size={vocab}; evaluate on data tokenized for this model"
        )
    seq = args.seq_len or model.cfg.max_seq_len
    windows = (len(tokens) - 1) // seq  # the file once through, in order: window i predicts tokens i*seq+1 .. (i+1)*seq
    max_tokens = getattr(args, "max_tokens", None)
    if max_tokens is not None:
        windows = min(windows, max_tokens // seq)
    if getattr(args, "batches", None) is not None:
        windows = min(windows, args.batches * args.batch_size)
    if windows < 1:
        raise DataError(
            f"{path} holds {len(tokens)} tokens, fewer than one window of --seq-len={seq} + 1; pass a shorter --seq-len or more data"
        )
    layers = model.moe_layers()
    loads = [torch.zeros(m.experts.num_experts) for m in layers]
    total = 0.0
    with torch.no_grad():
        for first in range(0, windows, args.batch_size):
            rows = range(first, min(first + args.batch_size, windows))
            t = torch.from_numpy(
                np.stack([np.asarray(tokens[i * seq : i * seq + seq + 1], dtype=np.int64) for i in rows])
            )
            x, y = t[:, :-1], t[:, 1:]
            if int(t.max()) >= vocab:
                raise DataError(f"{path} holds token id {int(t.max())} >= model.vocab_size={vocab}")
            total += F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), reduction="sum").item()
            for i, m in enumerate(layers):
                loads[i] += m.last_stats["tokens_per_expert"].float()
    scored = windows * seq
    loss = total / scored
    unscored = len(tokens) - 1 - scored
    byte_level = trained_on_bytes or (vocab <= 256 and prepared is None)
    result = {"loss": loss, "tokens": scored, "file_tokens": len(tokens), "windows": windows}
    if byte_level:
        result["bits_per_byte"] = loss / math.log(2)
    else:
        result["perplexity"] = math.exp(min(loss, 700))
    result["expert_load"] = [(load / load.sum().clamp_min(1)).tolist() for load in loads]
    unit = f"{result['bits_per_byte']:.4f} bits/byte" if byte_level else f"perplexity {result['perplexity']:.3f}"
    left = f"; {unscored} tokens past the last whole window (or --max-tokens) not scored" if unscored else ""
    print(
        f"{path}: loss {loss:.4f} nats/{'byte' if byte_level else 'token'} ({unit}) on {scored} of its {len(tokens)} tokens, "
        f"read once in order in {windows} windows of {seq}{left}"
    )
    for i, frac in enumerate(result["expert_load"]):
        top = max(frac) * len(frac) if frac else 0
        print(f"  MoE layer {i}: expert load {' '.join(f'{f:.3f}' for f in frac)} (max/mean {top:.2f})")
    return result


TRUST_HELP = (
    "also load the pickle-based checkpoints of earlier moeflow versions (loading them can run code): only your own"
)


def main_generate(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="moeflow generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="run dir or checkpoint")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling when --temperature > 0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json or folder (default: the run's own)")
    ap.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    generate(ap.parse_args(argv))


def main_eval(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="moeflow eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="run dir or checkpoint")
    ap.add_argument(
        "--data",
        required=True,
        help="token file (moeflow data prepare's val.bin or train.bin); a text file for byte-level runs (data=stdlib/text)",
    )
    ap.add_argument("--dtype", default="uint16", choices=("uint16", "uint32"), help="when the file has no meta.json")
    ap.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="score at most this many tokens (default: the whole file, once, in order)",
    )
    ap.add_argument("--batches", type=int, default=None, help="score at most this many batches of --batch-size windows")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    ap.add_argument("--seq-len", type=int, default=None, help="default: model.max_seq_len")
    ap.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    evaluate(ap.parse_args(argv))
