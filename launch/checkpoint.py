"""A run's checkpoints on disk: where they are, when one is complete, and the small files beside them.

    <run dir>/checkpoints/step_00000100/
        .metadata, __0_0.distcp, ...   sharded model + optimizer (torch.distributed.checkpoint; every rank
                                        writes its own shards, any layout loads them: parallel/checkpoint.py)
        model.safetensors               or: consolidated weights (`moeflow upcycle`, conversions)
        trainer_state.json              step, schedule, engine
        rng/rank_00000.json             each rank's RNG streams
        meta.json                       model and run config; written last: its presence marks a complete checkpoint

Nothing here is pickled: JSON, DCP's tensors and safetensors. A checkpoint is written under a
temporary name and renamed into place, so a killed run never leaves a half-written one that
`resume` could pick; `list_checkpoints` sees only complete ones. Checkpoints of older moeflow
versions (`trainer_state.pt`) still load, through `torch.load(weights_only=True)` with an
allow-list of the numpy types their RNG state holds.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moeflow.moe.errors import CheckpointError
from moeflow.moe.model import ModelConfig
from moeflow.moe.state import state_shapes

CKPT_DIR = "checkpoints"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
META = "meta.json"
TRAINER_STATE = "trainer_state.json"
LEGACY_TRAINER_STATE = "trainer_state.pt"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # consolidated weights in several files (large models)
DCP_METADATA = ".metadata"


# -- RNG state as JSON -------------------------------------------------------------------
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist(), "numpy": _numpy_state_json(np.random.get_state()),
             "python": _python_state_json(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(_byte_tensor(state["torch"]))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], np.asarray(numpy_state["keys"], dtype=np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]) if isinstance(py, list) else py)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


def _byte_tensor(v) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.uint8)


def _numpy_state_json(s) -> dict:
    return {"kind": s[0], "keys": s[1].tolist(), "pos": int(s[2]), "has_gauss": int(s[3]), "cached_gaussian": float(s[4])}


def _python_state_json(s) -> list:
    return [s[0], list(s[1]), s[2]]


def rng_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / "rng" / f"rank_{rank:05d}.json"


def write_rng(ckpt: Path, rank: int) -> None:
    path = rng_file(ckpt, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_durably(path, json.dumps(rng_state()))


def read_rng(ckpt: Path, rank: int) -> dict | None:
    """This rank's RNG streams; rank 0's for a rank the writing run did not have; None if none saved."""
    for path in (rng_file(ckpt, rank), rng_file(ckpt, 0)):
        if path.is_file():
            return _read_json(path)
    return None


# -- writing ----------------------------------------------------------------------------
def _write_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def temp_dir(run_dir: Path, step: int) -> Path:
    """Where checkpoint `step` is written before it is committed (the same name on every rank)."""
    return Path(run_dir) / CKPT_DIR / f"{TMP_PREFIX}{PREFIX}{step:08d}"


def final_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"{PREFIX}{step:08d}"


def commit(tmp: Path, meta: dict, trainer_state: dict | None, keep: int) -> Path:
    """Write meta.json (and trainer_state.json) into `tmp`, rename it into place, prune old checkpoints."""
    if trainer_state is not None:
        _write_durably(tmp / TRAINER_STATE, json.dumps(trainer_state, default=_jsonable))
    _write_durably(tmp / META, json.dumps(meta, indent=2, default=str))
    final = tmp.parent / tmp.name[len(TMP_PREFIX):]
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(final.parent, keep)
    return final


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def save_checkpoint(run_dir: Path, step: int, model_state: dict, trainer_state: dict | None, meta: dict, keep: int = 2) -> Path:
    """A consolidated checkpoint (one process: `moeflow upcycle`, conversions): safetensors weights
    and, unless weights-only, the step and schedule (JSON)."""
    tmp = temp_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(model_state, str(tmp / WEIGHTS))
        with open(tmp / WEIGHTS, "rb") as f:
            os.fsync(f.fileno())
        return commit(tmp, {**meta, "step": step}, trainer_state, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_streamed(run_dir: Path, step: int, named_tensors, meta: dict, shard_bytes: int, progress=None) -> Path:
    """A weights-only consolidated checkpoint written tensor by tensor from an iterator, in
    safetensors files of at most `shard_bytes` (an index when there are several), so a model
    larger than memory is never held whole (`moeflow convert hf-to-moeflow`)."""
    tmp = temp_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files, shard, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal shard, size
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name))
            files.append(name)
            weight_map.update({k: name for k in shard})
            shard, size = {}, 0

    try:
        for name, tensor in named_tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if size and size + nbytes > shard_bytes:
                flush()
            shard[name], size = tensor.contiguous(), size + nbytes
            if progress is not None:
                progress(name)
        flush()
        if len(files) == 1:
            (tmp / files[0]).rename(tmp / WEIGHTS)
        else:
            (tmp / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"format": "moeflow"}, "weight_map": weight_map}, indent=1))
        return commit(tmp, {**meta, "step": step}, None, keep=0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def remove_temp_dirs(run_dir: Path) -> list[Path]:
    """Left by a run killed mid-save: never picked by resume, removed when the next run starts."""
    root = Path(run_dir) / CKPT_DIR
    found = sorted(root.glob(f"{TMP_PREFIX}*")) if root.is_dir() else []
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return found


# -- finding and reading ------------------------------------------------------------------
def is_checkpoint(p: Path) -> bool:
    return (p / META).is_file() and any((p / f).is_file() for f in (DCP_METADATA, WEIGHTS, WEIGHTS_INDEX))


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and is_checkpoint(p)]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def find_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint dir itself, or the latest complete checkpoint of a run dir."""
    p = Path(path)
    if is_checkpoint(p):
        return p
    found = list_checkpoints(p / CKPT_DIR) or list_checkpoints(p)
    return found[-1] if found else None


def is_sharded(ckpt: Path) -> bool:
    return (Path(ckpt) / DCP_METADATA).is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); resume from an earlier checkpoint") from None


def read_meta(ckpt: Path) -> dict:
    return _read_json(Path(ckpt) / META)


def weight_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a consolidated checkpoint: one, or the shards its index lists."""
    ckpt = Path(ckpt)
    if (ckpt / WEIGHTS_INDEX).is_file():
        index = _read_json(ckpt / WEIGHTS_INDEX)
        return [ckpt / f for f in sorted(set(index.get("weight_map", {}).values()))]
    return [ckpt / WEIGHTS]


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The consolidated weights of a safetensors checkpoint."""
    out = {}
    for f in weight_files(ckpt):
        try:
            out.update(load_file(str(f)))
        except Exception as e:  # safetensors raises several types for truncated/corrupt files
            raise CheckpointError(f"checkpoint {ckpt} has a corrupt {f.name} ({e}); delete it or resume from an earlier checkpoint") from None
    return out


def load_full_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every weight at full size on the CPU, from either format (tools: export, conversion, upcycling)."""
    if is_sharded(ckpt):
        from moeflow.parallel.checkpoint import read_full_tensors

        return read_full_tensors(ckpt, "model.")
    return load_model_state(ckpt)


def load_trainer_state(ckpt: Path) -> dict | None:
    """Step, schedule and engine (JSON; or an older moeflow's trainer_state.pt, unpickled safely); None if absent."""
    ckpt = Path(ckpt)
    if (ckpt / TRAINER_STATE).is_file():
        return _read_json(ckpt / TRAINER_STATE)
    if (ckpt / LEGACY_TRAINER_STATE).is_file():
        return _load_legacy_trainer_state(ckpt / LEGACY_TRAINER_STATE)
    return None


def _load_legacy_trainer_state(path: Path) -> dict:
    """torch.load(weights_only=True): tensors, containers and the numpy RNG state's types, nothing else."""
    import numpy.core.multiarray as multiarray  # noqa: F401  (the types older checkpoints reference)

    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not loadable without running code from it ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                              f"moeflow never unpickles checkpoints beyond tensors and plain values: resume from a checkpoint written by moeflow") from None


SHAPE_KEYS = tuple(ModelConfig.shape_keys())  # the fields moe/config.py marks with shape_field


def model_shape_diffs(saved_model_cfg: dict, model_cfg: dict) -> list[str]:
    """The model-config keys that change parameter shapes and differ, as 'key: checkpoint X vs run Y'.

    A key missing from a config (saved before that field existed) counts as its default.
    """
    defaults = ModelConfig.shape_keys()
    saved = {k: saved_model_cfg.get(k, d) for k, d in defaults.items()}
    run = {k: model_cfg.get(k, d) for k, d in defaults.items()}
    return [f"{k}: checkpoint {saved[k]!r} vs run {run[k]!r}" for k in SHAPE_KEYS if saved[k] != run[k]]


def expected_shapes(model_cfg: ModelConfig) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """(shapes of every stored tensor, every name it may be stored under: tied weights have two)."""
    from moeflow.moe.model import Transformer

    with torch.device("meta"):  # the single-process shapes, at no cost
        model = Transformer(model_cfg)
    return state_shapes(model), {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def check_compatible(ckpt: Path, saved_model_cfg: dict, model_cfg: ModelConfig, stored: dict[str, tuple[int, ...]]) -> None:
    """Refuse a checkpoint whose model shape differs from `model_cfg`'s, naming the differing keys.
    `stored`: the checkpoint's weight names and shapes (its model weights only)."""
    diffs = model_shape_diffs(saved_model_cfg, model_cfg.to_dict())
    if not diffs:
        expected, names = expected_shapes(model_cfg)
        bad = [f"{k}: missing" for k in sorted(set(expected) - set(stored))]
        bad += [f"{k}: {stored[k]} vs {shape}" for k, shape in sorted(expected.items()) if k in stored and tuple(stored[k]) != shape]
        bad += [f"{k}: not in this model" for k in sorted(set(stored) - names)]
        if bad:
            diffs.append(f"parameters differ, e.g. {bad[:3]}")
    if diffs:
        raise CheckpointError(
            f"checkpoint {ckpt} is from a different model shape ({'; '.join(diffs)}); "
            f"resume with the checkpoint's model config (see {ckpt / META}) or start a fresh run without resume"
        )


def stored_weight_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Weight names and shapes of a checkpoint, read from its metadata or file header (no tensor data)."""
    if is_sharded(ckpt):
        from moeflow.parallel.checkpoint import stored_tensors

        return {k[len("model."):]: shape for k, (shape, _) in stored_tensors(ckpt).items() if k.startswith("model.")}
    from safetensors import safe_open

    shapes = {}
    for path in weight_files(ckpt):
        try:
            with safe_open(str(path), "pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as e:
            raise CheckpointError(f"checkpoint {ckpt} has a corrupt {path.name} ({e}); delete it or resume from an earlier checkpoint") from None
    return shapes
