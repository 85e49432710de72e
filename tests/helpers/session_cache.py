"""Run an expensive multi-process computation once per test session, also under pytest-xdist."""

from __future__ import annotations

import torch
from filelock import FileLock


def once(tmp_path_factory, worker_id: str, key: str, compute):
    """compute(tmp_dir) on the first worker that asks; the others read its result (a file cache
    in the session's shared temp dir, guarded by a lock)."""
    if worker_id == "master":
        return compute(tmp_path_factory.mktemp(key))
    root = tmp_path_factory.getbasetemp().parent  # this session's dir, shared by the xdist workers
    cached = root / f"{key}.pt"
    with FileLock(str(root / f"{key}.lock")):
        if not cached.exists():
            torch.save(compute(tmp_path_factory.mktemp(key)), cached)
    return torch.load(cached, weights_only=False)
