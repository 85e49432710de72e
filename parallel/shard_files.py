"""Checkpoint files on disk: a safetensors file written with its digest computed on the way, and the
same digest of any file read back, both at the speed of the disk rather than of one hashing core.

The digest guards against damage (flipped bytes, truncation, a file swapped for another), not
against an attacker who can rewrite index.json too: that is what parsing files as data is for.
It is a tree: the file's bytes in LEAF_BYTES leaves, each leaf's CRC-32 computed on a thread pool
(zlib releases the GIL; CRC-32 detects every burst of up to 32 flipped bits and misses other
damage with probability 2^-32 per leaf, at twice sha256's speed on these CPUs), and the sha256 of
the leaves' CRCs in order. Its leaves are checked in parallel, beside the write and beside the
read, so a save costs about what writing the bytes does (`moeflow bench checkpoint`).

The writer emits the safetensors layout itself (an 8-byte little-endian header size, the JSON
header padded to 8 bytes, then each tensor's bytes), straight from the tensors' memory, so the
bytes it writes are the bytes it hashes; every file is read back through the safetensors library.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

LEAF_BYTES = 64 * 2**20
DIGEST = "crc32-64MiB-leaves+sha256"
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}

_pool: ThreadPoolExecutor | None = None


def _hash_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(
            max_workers=max(2, min(16, os.cpu_count() or 2)), thread_name_prefix="moeflow-digest"
        )
    return _pool


def _leaf(parts: list[memoryview]) -> bytes:
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    return crc.to_bytes(4, "little")


class TreeHasher:
    """Feed bytes in order (`update`, zero-copy views); leaves are hashed on the pool as they fill."""

    def __init__(self):
        self.leaves: list[Future] = []
        self.parts: list[memoryview] = []
        self.filled = 0

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), LEAF_BYTES - self.filled)
            self.parts.append(view[:take])
            self.filled += take
            view = view[take:]
            if self.filled == LEAF_BYTES:
                self._close_leaf()

    def _close_leaf(self) -> None:
        self.leaves.append(_hash_pool().submit(_leaf, self.parts))
        self.parts, self.filled = [], 0

    def hexdigest(self) -> str:
        if self.filled or not self.leaves:
            self._close_leaf()
        return hashlib.sha256(b"".join(f.result() for f in self.leaves)).hexdigest()


def _bytes_of(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
    """Write `tensors` as a safetensors file (fsync'd); (its size in bytes, its digest)."""
    header, views, offset = {}, [], 0
    for name, t in tensors.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors name")
        view = _bytes_of(t)
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(view)],
        }
        views.append(view)
        offset += len(view)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    prefix = struct.pack("<Q", len(head)) + head
    hasher = TreeHasher()
    with open(path, "wb") as f:
        for view in (memoryview(prefix), *views):
            f.write(view)
            hasher.update(view)
        f.flush()
        os.fsync(f.fileno())
    return len(prefix) + offset, hasher.hexdigest()


def _read_leaf(path: Path, start: int, size: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        crc, left = 0, size
        while left:
            chunk = f.read(min(left, 16 * 2**20))
            if not chunk:
                break
            crc = zlib.crc32(chunk, crc)
            left -= len(chunk)
        return crc.to_bytes(4, "little")


class PendingDigest:
    """The digest of a file, its leaves being read and hashed on the pool; `hexdigest()` waits."""

    def __init__(self, path: Path):
        size = Path(path).stat().st_size
        starts = range(0, max(size, 1), LEAF_BYTES)
        self.leaves = [_hash_pool().submit(_read_leaf, Path(path), s, min(LEAF_BYTES, size - s)) for s in starts]

    def hexdigest(self) -> str:
        return hashlib.sha256(b"".join(f.result() for f in self.leaves)).hexdigest()


def file_digest(path: Path) -> str:
    """The digest `write_safetensors` returns for the same bytes, of any file."""
    return PendingDigest(path).hexdigest()
