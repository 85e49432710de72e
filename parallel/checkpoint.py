"""Sharded checkpoints on `torch.distributed.checkpoint` (DCP): every rank writes its own shards.

`save_sharded(path, state)` / `load_sharded(path, state)` take a state dict whose tensors may
be DTensors (FSDP, expert parallelism) or plain tensors: DCP writes each shard once, with the
global layout in its metadata, and a later load into any other layout (world size, dp_shard,
ep, one process) reads just the slices each rank needs. `model_and_optimizer_state` and
`apply_model_and_optimizer_state` give the FQN-keyed (layout-free) state of a model and its
optimizer through `torch.distributed.checkpoint.state_dict`.

Safety: DCP stores its `.metadata` file with pickle, and its reader unpickles it with no
restriction, so a hostile file could run code on resume. `SafeFileSystemReader` reads it
with an unpickler that admits only DCP's own metadata classes and plain values; everything
else in a checkpoint (tensors, and the few small objects such as optimizer hyperparameters)
DCP already loads with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from moeflow.moe.errors import CheckpointError

METADATA_FILE = ".metadata"


class _MetadataUnpickler(pickle.Unpickler):
    """Only what DCP's metadata is made of: its dataclasses, torch dtypes/sizes/layouts, containers."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
               "torch.distributed.checkpoint._extension", "torch.distributed.checkpoint.planner")
    ALLOWED = {("torch", "Size"), ("torch", "float32"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
               ("collections", "OrderedDict"), ("torch", "device"), ("torch.serialization", "_get_layout"),
               ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}

    def find_class(self, module: str, name: str):
        if module in self.MODULES or (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        if module == "enum" and name == "Enum":
            return super().find_class(module, name)
        raise CheckpointError(f"checkpoint metadata asks to load {module}.{name}, which is not part of a DCP checkpoint; "
                              f"refusing to unpickle it (the file was not written by moeflow, or was tampered with)")


def read_metadata_safely(path: Path) -> Metadata:
    try:
        data = (Path(path) / METADATA_FILE).read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} has no readable {METADATA_FILE} ({e.strerror or e}); resume from another checkpoint") from None
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated or corrupt pickle
        raise CheckpointError(f"checkpoint {path} has a corrupt {METADATA_FILE} ({type(e).__name__}); resume from another checkpoint") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint {path}: {METADATA_FILE} does not hold DCP metadata; resume from another checkpoint")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's filesystem reader with the metadata read through `_MetadataUnpickler`."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        if kwargs.get("rank") is not None:  # per-rank metadata files: not written by moeflow
            raise CheckpointError(f"checkpoint {self.path} uses per-rank metadata, which moeflow does not write")
        metadata = read_metadata_safely(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / METADATA_FILE).is_file()


def stored_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor a DCP checkpoint holds: flattened key -> (global shape, dtype), from its metadata alone."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = read_metadata_safely(path)
    return {k: (tuple(v.size), v.properties.dtype) for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def save_sharded(path: Path, state: dict, process_group=None, asynchronous: bool = False):
    """Write `state` (collective); with `asynchronous`, return a future that completes when the
    metadata is written (the checkpoint is complete), the state having been staged to CPU first."""
    no_dist = not dist.is_initialized()  # one process: no collectives
    with _single_process_quietly():
        if asynchronous:
            return dcp.async_save(state, checkpoint_id=str(path), process_group=process_group, no_dist=no_dist)
        dcp.save(state, checkpoint_id=str(path), process_group=process_group, no_dist=no_dist)
    return None


@contextlib.contextmanager
def _single_process_quietly():
    """DCP warns on every single-process save and load that it assumes a single process: it is one."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def load_sharded(path: Path, state: dict) -> None:
    """Fill `state`'s tensors in place from the checkpoint at `path` (any layout it was written in)."""
    from torch.distributed.checkpoint.api import CheckpointException

    read_metadata_safely(path)  # refuse a hostile or corrupt file here, in one line, before DCP's machinery runs
    try:
        with _single_process_quietly():
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), no_dist=not dist.is_initialized())
    except CheckpointError:
        raise
    except (CheckpointException, RuntimeError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} could not be read into this model ({first[:300]}): it is corrupt or "
                              f"from another model; resume from an earlier checkpoint, or with the checkpoint's model config") from None


def model_and_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """{"model": ..., "optim": ...}: FQN-keyed, sharded state dicts (DTensors where the model is sharded)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def apply_model_and_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if optimizer is None or "optim" not in state:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def async_process_group():
    """A gloo group for async saves' background collectives (they must not share the training group)."""
    if not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo")


__all__ = ["SafeFileSystemReader", "apply_model_and_optimizer_state", "async_process_group", "is_sharded_checkpoint", "iter_full_tensors", "read_full_tensors",
           "load_sharded", "model_and_optimizer_state", "read_metadata_safely", "save_sharded", "stored_tensors"]


def iter_full_tensors(path: Path, prefix: str = "", max_bytes: int = 2 * 2**30):
    """(name without `prefix`, full tensor) for every stored tensor under `prefix`, loaded in batches of
    at most `max_bytes` on the CPU of this process alone (no process group): for exports and tools."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = read_metadata_safely(path)
    items = [(k, v) for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata) and k.startswith(prefix)]
    batch, size = {}, 0
    for i, (key, meta) in enumerate(items):
        t = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        batch[key], size = t, size + t.numel() * t.element_size()
        if size >= max_bytes or i == len(items) - 1:
            with _single_process_quietly():
                dcp.load(batch, storage_reader=SafeFileSystemReader(str(path)), no_dist=True)
            for k, v in batch.items():
                yield k[len(prefix):], v
            batch, size = {}, 0


def read_full_tensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    return dict(iter_full_tensors(path, prefix))
