"""Sharded checkpoints with no pickle in them: `torch.distributed.checkpoint` (DCP) planning, safetensors shards, JSON.

DCP plans who writes what (each shard once, with its global offsets) and, on load, which slices
each rank needs in whatever layout it has now (world size, dp_shard, ep, one process): that is
what makes checkpoints reshard. What DCP would store with pickle is replaced here:

    shard_00000.safetensors ...   each rank's tensor shards (safetensors: a JSON header, raw bytes)
    index.json                    every tensor's dtype, global shape and chunks (offsets, sizes,
                                  file, key), each shard file's size and digest (parallel/shard_files.py),
                                  and the digests of the folder's JSON files; written last, by rank 0,
                                  once every shard is on disk: it marks the data complete
    state.json                    the non-tensor leaves of the state (optimizer hyperparameters)

`save_sharded` / `load_sharded` take a nested state dict whose tensors may be DTensors (FSDP,
expert parallelism) or plain tensors. Non-tensor leaves go to state.json as JSON, and a value
JSON cannot hold is refused at save time rather than pickled. On load, index.json is parsed
strictly (names inside the folder, known dtypes, chunks inside their tensor), every shard's size
is checked, and each rank checks the digest of the shards it reads (`verify`, on by default),
hashing them beside the read.

Checkpoints of moeflow versions before this format (`.metadata` + `.distcp`, both pickles) load
only with `trust=True` (`trainer.trust_checkpoint=true`, `--trust-checkpoint`): loading them
can run code stored in them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from moeflow.moe.errors import CheckpointError

from .shard_files import DIGEST, PendingDigest, file_digest, write_safetensors

# DCP says on every single-process save and load (also from an async save's thread) that it assumes one process: it is one
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")

INDEX = "index.json"
STATE = "state.json"
FORMAT = "moeflow-sharded/1"
LEGACY_METADATA = ".metadata"  # pickle-based DCP checkpoints of earlier moeflow versions
SHARD_NAME = re.compile(r"shard_\d{5}\.safetensors")
DTYPES = {
    name: getattr(torch, name)
    for name in (
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
        "float8_e4m3fn",
        "float8_e5m2",
    )
}


def shard_name(rank: int) -> str:
    return f"shard_{rank:05d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- tensors apart from plain values -------------------------------------------------------
def split_state(state, prefix: str = "", path: tuple = ()) -> tuple[dict[str, torch.Tensor], dict[tuple, object]]:
    """(flat tensors keyed by dotted paths, as DCP flattens them: `{"model": {"w": t}}` -> `model.w`;
    non-tensor leaves keyed by their path tuple, since model names hold dots themselves)."""
    tensors, plain = {}, {}
    items = state.items() if isinstance(state, dict) else enumerate(state)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, torch.Tensor):
            tensors[key] = v
        elif isinstance(v, dict) or (
            isinstance(v, (list, tuple)) and any(isinstance(x, (dict, list, tuple, torch.Tensor)) for x in v)
        ):
            t, p = split_state(v, key + ".", path + (k,))
            tensors.update(t)
            plain.update(p)
        else:
            plain[path + (k,)] = v
    return tensors, plain


def _jsonable(key: str, value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(key, v) for v in value]
    raise CheckpointError(
        f"checkpoint state {key!r} holds a {type(value).__name__}, which moeflow does not store "
        f"(only tensors and JSON values: nothing in a checkpoint is pickled); this is a moeflow bug, please report it"
    )


def _fill_plain(state, key_path: tuple, value) -> None:
    """Set the non-tensor leaf at `key_path` of `state` to `value`, in the type the state holds there."""
    node = state
    for k in key_path[:-1]:
        node = node[k]
    last = key_path[-1]
    current = node[last]
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    node[last] = value


# -- the writer --------------------------------------------------------------------------
class SafetensorsShardWriter(StorageWriter):
    """DCP storage: each rank's shards in one safetensors file, the index in JSON (no pickle)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path, self.rank = Path(path), 0

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id:
            self.path = Path(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args, **kwargs) -> None:
        rank = kwargs.get("rank")
        self.rank = int(rank) if rank is not None else (dist.get_rank() if dist.is_initialized() else 0)

    def prepare_local_plan(self, plan):
        byte_items = [item.index.fqn for item in plan.items if item.type == WriteItemType.BYTE_IO]
        if byte_items:  # never pickled: save_sharded moves non-tensors to state.json first
            raise CheckpointError(
                f"checkpoint state {byte_items[0]!r} is not a tensor; moeflow stores only tensors in shards (a bug, please report it)"
            )
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def write_data(self, plan, planner) -> Future:
        tensors, results = {}, []
        name = shard_name(self.rank)
        for item in plan.items:
            t = planner.resolve_data(item).detach()
            key = (
                item.index.fqn
                if item.index.fqn not in tensors
                else f"{item.index.fqn}@{','.join(map(str, item.index.offset))}"
            )
            tensors[key] = t.to("cpu").contiguous()
            results.append((item, key))
        out = []
        if tensors:
            size, digest = write_safetensors(self.path / name, tensors)  # hashed beside the write
            info = {"file": name, "bytes": size, "digest": digest}
            out = [
                WriteResult(
                    index=item.index,
                    size_in_bytes=tensors[key].numel() * tensors[key].element_size(),
                    storage_data={**info, "key": key},
                )
                for item, key in results
            ]
        fut: Future = Future()
        fut.set_result(out)
        return fut

    def finish(self, metadata: Metadata, results) -> None:
        """Rank 0, once every rank's shards are written: index.json (written to a temp name, then renamed)."""
        where = {}
        files = {}
        for rank_results in results:
            for r in rank_results:
                where[(r.index.fqn, tuple(r.index.offset))] = r.storage_data
                files[r.storage_data["file"]] = {"bytes": r.storage_data["bytes"], "digest": r.storage_data["digest"]}
        tensors = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointError(f"checkpoint state {fqn!r} is not a tensor (a bug, please report it)")
            chunks = []
            for c in md.chunks:
                sd = where[(fqn, tuple(c.offsets))]
                chunks.append(
                    {"offsets": list(c.offsets), "sizes": list(c.sizes), "file": sd["file"], "key": sd["key"]}
                )
            tensors[fqn] = {"dtype": _dtype_name(md.properties.dtype), "shape": list(md.size), "chunks": chunks}
        manifest = {
            str(p.relative_to(self.path)): file_digest(p)
            for p in sorted(self.path.rglob("*.json"))
            if p.name != INDEX and not p.name.endswith(".tmp")
        }
        index = {"format": FORMAT, "digest": DIGEST, "files": files, "manifest": manifest, "tensors": tensors}
        tmp = self.path / (INDEX + ".tmp")
        with open(tmp, "w") as f:
            json.dump(index, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path / INDEX)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path))


# -- the index, parsed as untrusted data ---------------------------------------------------
def _int_list(v, what: str, path: Path) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise CheckpointError(
            f"checkpoint {path}: {INDEX} has a malformed {what}; the file was not written by moeflow or was edited: resume from another checkpoint"
        )
    return v


def read_index(path: Path) -> dict:
    """index.json, checked: every name a shard file inside the folder, dtypes known, chunks inside
    their tensors, every listed file present at its recorded size."""
    path = Path(path)
    bad = "; the file was not written by moeflow or was edited: resume from another checkpoint"
    try:
        index = json.loads((path / INDEX).read_text())
    except FileNotFoundError:
        if (path / LEGACY_METADATA).is_file():
            raise CheckpointError(legacy_message(path)) from None
        raise CheckpointError(
            f"checkpoint {path} has no {INDEX}: its save did not complete; resume from another checkpoint"
        ) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: {INDEX} is unreadable ({type(e).__name__}){bad}") from None
    if (
        not isinstance(index, dict)
        or index.get("format") != FORMAT
        or index.get("digest") != DIGEST
        or not isinstance(index.get("files"), dict)
        or not isinstance(index.get("tensors"), dict)
    ):
        raise CheckpointError(f"checkpoint {path}: {INDEX} is not a {FORMAT} index{bad}")
    for name, info in index["files"].items():
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
            raise CheckpointError(
                f"checkpoint {path}: {INDEX} names a file {name!r} that is not a shard of this folder{bad}"
            )
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("bytes"), int)
            or not isinstance(info.get("digest"), str)
        ):
            raise CheckpointError(f"checkpoint {path}: {INDEX} has a malformed entry for {name}{bad}")
        try:
            size = (path / name).stat().st_size
        except OSError:
            raise CheckpointError(
                f"checkpoint {path} is incomplete: {name} is missing; resume from another checkpoint"
            ) from None
        if size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint {path} is damaged: {name} has {size} bytes, {INDEX} says {info['bytes']}; resume from another checkpoint"
            )
    manifest = index.get("manifest")
    if not isinstance(manifest, dict):
        raise CheckpointError(f"checkpoint {path}: {INDEX} has no manifest of the folder's other files{bad}")
    for (
        rel,
        want,
    ) in manifest.items():  # meta.json, trainer_state.json, state.json, the RNG files: as written with these shards
        if (
            not isinstance(rel, str)
            or not re.fullmatch(r"(rng/rank_\d{5}|meta|trainer_state|state)\.json", rel)
            or not isinstance(want, str)
        ):
            raise CheckpointError(
                f"checkpoint {path}: {INDEX} lists {rel!r} in its manifest, not a file of a checkpoint{bad}"
            )
        target = path / rel
        if not target.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {rel} is missing; resume from another checkpoint")
        if file_digest(target) != want:
            raise CheckpointError(
                f"checkpoint {path} is damaged: {rel} does not match its digest in {INDEX} (edited, or copied from another "
                f"checkpoint); resume from another checkpoint"
            )
    for fqn, t in index["tensors"].items():
        if not isinstance(t, dict) or t.get("dtype") not in DTYPES or not isinstance(t.get("chunks"), list):
            raise CheckpointError(f"checkpoint {path}: {INDEX} has a malformed entry for tensor {fqn!r}{bad}")
        shape = _int_list(t.get("shape"), f"shape of {fqn!r}", path)
        for c in t["chunks"]:
            if not isinstance(c, dict) or c.get("file") not in index["files"] or not isinstance(c.get("key"), str):
                raise CheckpointError(f"checkpoint {path}: {INDEX} has a chunk of {fqn!r} in no listed shard file{bad}")
            off, size = (
                _int_list(c.get("offsets"), f"chunk of {fqn!r}", path),
                _int_list(c.get("sizes"), f"chunk of {fqn!r}", path),
            )
            if len(off) != len(shape) or len(size) != len(shape) or any(o + s > n for o, s, n in zip(off, size, shape)):
                raise CheckpointError(f"checkpoint {path}: {INDEX} has a chunk of {fqn!r} outside the tensor{bad}")
    return index


def legacy_message(path: Path) -> str:
    return (
        f"checkpoint {path} is in the pickle-based format of earlier moeflow versions (.metadata/.distcp), and loading it can run "
        f"code stored in it; if you trust where it came from, load it once with trainer.trust_checkpoint=true "
        f"(moeflow convert/generate/eval: --trust-checkpoint) and the next save writes the safe format"
    )


def is_legacy_checkpoint(path: Path) -> bool:
    return (Path(path) / LEGACY_METADATA).is_file() and not (Path(path) / INDEX).is_file()


def index_metadata(index: dict) -> Metadata:
    """The DCP Metadata an index describes (storage_data: (file, key) per chunk)."""
    sd_md, storage = {}, {}
    for fqn, t in index["tensors"].items():
        chunks = []
        for c in t["chunks"]:
            chunks.append(ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"])))
            storage[MetadataIndex(fqn=fqn, offset=torch.Size(c["offsets"]))] = (c["file"], c["key"], tuple(c["sizes"]))
        sd_md[fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=DTYPES[t["dtype"]]), size=torch.Size(t["shape"]), chunks=chunks
        )
    return Metadata(state_dict_metadata=sd_md, storage_data=storage)


# -- the reader --------------------------------------------------------------------------
class SafetensorsShardReader(StorageReader):
    """Reads what `SafetensorsShardWriter` wrote: slices through safetensors, each file's digest
    computed on a thread pool beside the read and checked before the load returns."""

    def __init__(self, path: str | os.PathLike, verify: bool = True, index: dict | None = None):
        super().__init__()
        self.path, self.verify, self.index = Path(path), verify, index
        self.storage_data: dict = {}
        self.verified: set[str] = (
            set()
        )  # shard files already checked (a reader reused over several loads reads them once)

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id:
            self.path = Path(checkpoint_id)

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if self.index is None:
            self.index = read_index(self.path)
        md = index_metadata(self.index)
        md.storage_meta = StorageMeta()
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def read_data(self, plan, planner) -> Future:
        from safetensors import safe_open

        per_file: dict[str, list] = {}
        for req in plan.items:
            if req.type == LoadItemType.BYTE_IO:
                raise CheckpointError(
                    f"checkpoint {self.path}: {req.storage_index.fqn!r} is not stored as a tensor; resume from another checkpoint"
                )
            per_file.setdefault(self.storage_data[req.storage_index][0], []).append(req)
        pending = (
            {name: PendingDigest(self.path / name) for name in per_file if name not in self.verified}
            if self.verify
            else {}
        )
        for name, reqs in per_file.items():
            path = self.path / name
            try:
                with safe_open(str(path), framework="pt") as f:
                    for req in reqs:
                        _, key, sizes = self.storage_data[req.storage_index]
                        piece = f.get_slice(key)
                        if tuple(piece.get_shape()) != sizes:
                            raise CheckpointError(
                                f"checkpoint {self.path} is damaged: {name}[{key}] has shape {piece.get_shape()}, {INDEX} says {list(sizes)}"
                            )
                        tensor = piece[tuple(slice(o, o + n) for o, n in zip(req.storage_offsets, req.lengths))]
                        target = planner.resolve_tensor(req).detach()
                        if target.size() != tensor.size():
                            raise CheckpointError(
                                f"checkpoint {self.path}: {req.storage_index.fqn} does not fit this model ({tuple(tensor.size())} vs {tuple(target.size())})"
                            )
                        target.copy_(tensor)
                        planner.commit_tensor(req, target)
            except CheckpointError:
                raise
            except Exception as e:  # safetensors' own errors for a damaged header or missing key
                raise CheckpointError(
                    f"checkpoint {self.path} is damaged: {name} cannot be read ({type(e).__name__}: {str(e)[:200]}); resume from another checkpoint"
                ) from None
        for name, digest in pending.items():  # before the load returns: a damaged file fails it
            self._check_digest(name, digest.hexdigest())
            self.verified.add(name)
        fut: Future = Future()
        fut.set_result(None)
        return fut

    def _check_digest(self, name: str, digest: str) -> None:
        expected = self.index["files"][name]["digest"] if self.index else None
        if expected is not None and digest != expected:
            raise CheckpointError(
                f"checkpoint {self.path} is damaged: {name} does not match its digest in {INDEX} (changed since it was written); "
                f"resume from another checkpoint (moeflow train loads it anyway with trainer.verify_checkpoint=false)"
            )

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True


# -- save and load ------------------------------------------------------------------------
@contextlib.contextmanager
def _single_process_quietly():
    """DCP warns on every single-process save and load that it assumes a single process: it is one.
    (Scoped here, so it holds wherever filters are reset, pytest included; the module-level filter
    above covers the warning an async save raises from its own thread.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def save_sharded(path: Path, state: dict, process_group=None, asynchronous: bool = False):
    """Write `state` (collective) into the existing folder `path`; with `asynchronous`, return a future
    that completes when index.json is written (the tensors having been staged to CPU first)."""
    path = Path(path)
    tensors, plain = split_state(state)
    if not dist.is_initialized() or dist.get_rank() == 0:
        text = json.dumps({"leaves": [[list(k), _jsonable(".".join(map(str, k)), v)] for k, v in plain.items()]})
        with open(path / STATE, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    no_dist = not dist.is_initialized()
    writer = SafetensorsShardWriter(path)
    with _single_process_quietly():
        if asynchronous:
            return dcp.async_save(tensors, storage_writer=writer, process_group=process_group, no_dist=no_dist)
        dcp.save(tensors, storage_writer=writer, process_group=process_group, no_dist=no_dist)
    return None


def load_sharded(path: Path, state: dict, verify: bool = True, trust: bool = False) -> None:
    """Fill `state` in place from the checkpoint at `path` (any layout it was written in): its tensors
    (DTensors get just their slices) and its non-tensor leaves (from state.json)."""
    path = Path(path)
    tensors, plain = split_state(state)
    if is_legacy_checkpoint(path):
        if not trust:
            raise CheckpointError(legacy_message(path))
        return _load_legacy(path, state)
    index = read_index(path)  # a hostile or damaged index is refused here, in one line, before DCP runs
    missing = sorted(set(tensors) - set(index["tensors"]))
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {len(missing)} tensors this run needs (e.g. {missing[0]!r}): it is from another "
            f"model or engine; resume with the checkpoint's config, or from another checkpoint"
        )
    if plain:
        saved = _read_state_json(path)
        wanted = _saved_keys(plain, saved)
        absent = [k for k, src in wanted.items() if src not in saved]
        if absent:
            raise CheckpointError(
                f"checkpoint {path}: {STATE} lacks {'.'.join(map(str, absent[0]))!r}; it is incomplete or from another engine: resume from another checkpoint"
            )
        for k, src in wanted.items():
            _fill_plain(state, k, saved[src])
    with _single_process_quietly(), _one_line_errors(path):
        dcp.load(tensors, storage_reader=SafetensorsShardReader(path, verify, index), no_dist=not dist.is_initialized())


def _saved_keys(plain: dict, saved: dict) -> dict:
    """Where each non-tensor leaf of this process's state is in the checkpoint's state.json. Optimizer
    groups are matched by name, not position, and keep their own parameter names: a pipeline stage
    holds other parameters (and maybe other groups) than the rank that wrote state.json, which is
    rank 0. A named group the checkpoint lacks keeps this run's settings, and so does a group whose
    checkpoint lacks one of torch's implementation switches (`IMPLEMENTATION_FLAGS`: a checkpoint of
    moeflow's own AdamW, `optim.master_weights` or bf16 moments, resumed with torch's)."""
    names = {k[:-1]: v for k, v in plain.items() if _group_leaf(k) and k[-1] == "name" and isinstance(v, str)}
    saved_at = {
        (k[:-2], v): k[:-1] for k, v in saved.items() if _group_leaf(k) and k[-1] == "name" and isinstance(v, str)
    }
    out = {}
    for k in plain:
        if not _group_leaf(k) or k[:-1] not in names:
            out[k] = k
        elif k[-1] != "params" and (k[:-2], names[k[:-1]]) in saved_at:
            out[k] = saved_at[(k[:-2], names[k[:-1]])] + (k[-1],)
    return {k: src for k, src in out.items() if src in saved or not (_group_leaf(k) and k[-1] in IMPLEMENTATION_FLAGS)}


# torch optimizers' per-group switches of how the step runs, not what it computes from
IMPLEMENTATION_FLAGS = frozenset(
    {"foreach", "fused", "capturable", "differentiable", "amsgrad", "maximize", "decoupled_weight_decay"}
)


def _group_leaf(key_path: tuple) -> bool:
    """A setting of one optimizer param group: (..., "param_groups", index, setting)."""
    return len(key_path) >= 3 and key_path[-3] == "param_groups"


@contextlib.contextmanager
def _one_line_errors(path: Path):
    """DCP wraps a reader's error in a CheckpointException (one per rank, with tracebacks): the
    reader's own one-line CheckpointError comes out, or one line naming the checkpoint."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointError:
        raise
    except CheckpointException as e:
        inner = [f[0] if isinstance(f, tuple) else f for f in (getattr(e, "failures", None) or {}).values()]
        first = next((x for x in inner if isinstance(x, CheckpointError)), None)
        if first is not None:
            raise CheckpointError(str(first)) from None
        raise CheckpointError(
            f"checkpoint {path} could not be read into this model ({str(e).strip().splitlines()[0][:300]}); resume from another checkpoint"
        ) from None
    except (RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} could not be read into this model ({first[:300]}): it is corrupt or "
            f"from another model; resume from an earlier checkpoint, or with the checkpoint's model config"
        ) from None


def _read_state_json(path: Path) -> dict:
    try:
        saved = json.loads((path / STATE).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: {STATE} is missing; resume from another checkpoint"
        ) from None
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path}: {STATE} is unreadable ({type(e).__name__}); resume from another checkpoint"
        ) from None
    leaves = saved.get("leaves") if isinstance(saved, dict) else None
    if not isinstance(leaves, list) or not all(
        isinstance(x, list) and len(x) == 2 and isinstance(x[0], list) for x in leaves
    ):
        raise CheckpointError(f"checkpoint {path}: {STATE} is not moeflow's state file; resume from another checkpoint")
    try:
        return {tuple(k): v for k, v in leaves}
    except TypeError:
        raise CheckpointError(
            f"checkpoint {path}: {STATE} is not moeflow's state file; resume from another checkpoint"
        ) from None


def _load_legacy(path: Path, state: dict) -> None:
    """The pickle-based format, with the user's explicit trust: DCP's own reader, unrestricted."""
    from torch.distributed.checkpoint import FileSystemReader

    with _single_process_quietly():
        dcp.load(state, storage_reader=FileSystemReader(str(path)), no_dist=not dist.is_initialized())


def verify_files(path: Path) -> None:
    """Every shard of a checkpoint against its digest (one process: tools, tests, benchmarks)."""
    index = read_index(path)
    reader = SafetensorsShardReader(path, True, index)
    for name in index["files"]:
        reader._check_digest(name, file_digest(Path(path) / name))


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / INDEX).is_file() or (Path(path) / LEGACY_METADATA).is_file()


def stored_tensors(path: Path, trust: bool = False) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor a sharded checkpoint holds: flattened key -> (global shape, dtype), from its index alone."""
    if is_legacy_checkpoint(path):
        if not trust:
            raise CheckpointError(legacy_message(path))
        from torch.distributed.checkpoint import FileSystemReader

        md = FileSystemReader(str(path)).read_metadata()
        return {
            k: (tuple(v.size), v.properties.dtype)
            for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)
        }
    return index_shapes(read_index(path))


def index_shapes(index: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(t["shape"]), DTYPES[t["dtype"]]) for k, t in index["tensors"].items()}


def iter_full_tensors(
    path: Path, prefix: str = "", max_bytes: int = 2 * 2**30, verify: bool = True, trust: bool = False
):
    """(name without `prefix`, full tensor) for every stored tensor under `prefix`, loaded in batches of
    at most `max_bytes` on the CPU of this process alone (no process group): for exports and tools."""
    legacy = is_legacy_checkpoint(path)
    index = None if legacy else read_index(path)
    stored = stored_tensors(path, trust) if legacy else index_shapes(index)
    items = [(k, v) for k, v in stored.items() if k.startswith(prefix)]
    reader = (
        None if legacy else SafetensorsShardReader(path, verify, index)
    )  # one reader: each shard's digest checked once
    batch, size = {}, 0
    for i, (key, (shape, dtype)) in enumerate(items):
        t = torch.empty(shape, dtype=dtype)
        batch[key], size = t, size + t.numel() * t.element_size()
        if size >= max_bytes or i == len(items) - 1:
            if legacy:
                _load_legacy(path, batch)
            else:
                with _single_process_quietly(), _one_line_errors(path):
                    dcp.load(batch, storage_reader=reader, no_dist=True)
            for k, v in batch.items():
                yield k[len(prefix) :], v
            batch, size = {}, 0


def read_full_tensors(
    path: Path, prefix: str = "", verify: bool = True, trust: bool = False
) -> dict[str, torch.Tensor]:
    return dict(iter_full_tensors(path, prefix, verify=verify, trust=trust))


def model_and_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """{"model": ..., "optim": ...}: FQN-keyed, sharded state dicts (DTensors where the model is sharded)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def apply_model_and_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict
) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if optimizer is None or "optim" not in state:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def async_process_group(timeout_s: float | None = None):
    """A gloo group for async saves' background collectives (they must not share the training group),
    with the run's collective timeout: a stalled peer fails the save instead of hanging the exit."""
    if not dist.is_initialized():
        return None
    from datetime import timedelta

    return dist.new_group(backend="gloo", timeout=None if timeout_s is None else timedelta(seconds=timeout_s))


__all__ = [
    "INDEX",
    "STATE",
    "SafetensorsShardReader",
    "SafetensorsShardWriter",
    "apply_model_and_optimizer_state",
    "async_process_group",
    "is_legacy_checkpoint",
    "is_sharded_checkpoint",
    "iter_full_tensors",
    "load_sharded",
    "model_and_optimizer_state",
    "read_full_tensors",
    "read_index",
    "save_sharded",
    "split_state",
    "stored_tensors",
    "verify_files",
]
