"""A run's checkpoints on disk: where they are, when one is complete, and the small files beside them.

    <run dir>/checkpoints/step_00000100/
        shard_00000.safetensors ...     sharded model + optimizer tensors, each rank's own shards
        index.json                      every tensor's global shape and chunks, each shard's size and digest;
                                        written once every shard is on disk (parallel/checkpoint.py)
        state.json                      the optimizer's non-tensor state (hyperparameters)
        model.safetensors               or: consolidated weights (`moeflow upcycle`, conversions)
        trainer_state.json              step, schedule, engine
        rng/rank_00000.json             each rank's RNG streams
        meta.json                       model and run config (and the digests of consolidated weight files)

Nothing here is pickled: JSON and safetensors. A checkpoint is written under a temporary name
(`.tmp-step_...`) and renamed into place once complete, so `resume` never picks a half-written
one; a temporary folder whose contents are complete (an async save that finished just before a
crash) is promoted by the next run instead of being thrown away. Only folders named exactly
`step_<8 digits>` count as checkpoints (a `step_00000010.bak` copy is ignored). Checkpoints of
older moeflow versions (`trainer_state.pt`) still load, through `torch.load(weights_only=True)`
with an allow-list of the numpy types their RNG state holds; their pickled DCP folders
(`.metadata`) need an explicit `trainer.trust_checkpoint=true`.
"""

from __future__ import annotations

import json
import os
import random
import re
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
DCP_INDEX = "index.json"  # a sharded checkpoint (parallel/checkpoint.py)
LEGACY_DCP_METADATA = ".metadata"  # a sharded checkpoint of earlier versions (pickles)
STEP_NAME = re.compile(r"step_(\d{8})")


# -- RNG state as JSON -------------------------------------------------------------------
def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": _numpy_state_json(np.random.get_state()),
        "python": _python_state_json(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    try:
        _set_rng_state(state)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise CheckpointError(
            f"a checkpoint's RNG streams are malformed ({type(e).__name__}: {str(e)[:120]}); resume from another checkpoint"
        ) from None


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(_byte_tensor(state["torch"]))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (
            numpy_state["kind"],
            np.asarray(numpy_state["keys"], dtype=np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    np.random.set_state(numpy_state)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]) if isinstance(py, list) else py)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


def _byte_tensor(v) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.uint8)


def _numpy_state_json(s) -> dict:
    return {
        "kind": s[0],
        "keys": s[1].tolist(),
        "pos": int(s[2]),
        "has_gauss": int(s[3]),
        "cached_gaussian": float(s[4]),
    }


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


def write_manifest(tmp: Path, meta: dict, trainer_state: dict | None) -> None:
    """meta.json and trainer_state.json into a checkpoint folder being written."""
    if trainer_state is not None:
        _write_durably(tmp / TRAINER_STATE, json.dumps(trainer_state, default=_jsonable))
    _write_durably(tmp / META, json.dumps(meta, indent=2, default=str))


def promote(tmp: Path, keep: int) -> Path:
    """Rename a complete temporary checkpoint folder into place and prune old checkpoints."""
    final = tmp.parent / tmp.name[len(TMP_PREFIX) :]
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(final.parent, keep)
    return final


def commit(tmp: Path, meta: dict, trainer_state: dict | None, keep: int) -> Path:
    """Write meta.json (and trainer_state.json) into `tmp`, rename it into place, prune old checkpoints."""
    write_manifest(tmp, meta, trainer_state)
    return promote(tmp, keep)


def weight_digests(folder: Path) -> dict:
    """The digest of each consolidated weight file in `folder`, for meta.json (verified on load)."""
    from moeflow.parallel.shard_files import DIGEST, file_digest

    return {"kind": DIGEST, "files": {p.name: file_digest(p) for p in sorted(Path(folder).glob("model*.safetensors"))}}


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def save_checkpoint(
    run_dir: Path, step: int, model_state: dict, trainer_state: dict | None, meta: dict, keep: int = 2
) -> Path:
    """A consolidated checkpoint (one process: `moeflow upcycle`, conversions): safetensors weights
    and, unless weights-only, the step and schedule (JSON)."""
    tmp = temp_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(model_state, str(tmp / WEIGHTS))
        with open(tmp / WEIGHTS, "rb") as f:
            os.fsync(f.fileno())
        return commit(tmp, {**meta, "step": step, "digests": weight_digests(tmp)}, trainer_state, keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_streamed(
    run_dir: Path,
    step: int,
    named_tensors,
    meta: dict,
    shard_bytes: int,
    progress=None,
    trainer_state: dict | None = None,
) -> Path:
    """A consolidated checkpoint written tensor by tensor from an iterator, in safetensors files of
    at most `shard_bytes` (an index when there are several), so a model larger than memory is
    never held whole (`moeflow convert hf-to-moeflow`, `moeflow-to-safetensors`)."""
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
            (tmp / WEIGHTS_INDEX).write_text(
                json.dumps({"metadata": {"format": "moeflow"}, "weight_map": weight_map}, indent=1)
            )
        return commit(tmp, {**meta, "step": step, "digests": weight_digests(tmp)}, trainer_state, keep=0)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def recover_temp_dirs(run_dir: Path, keep: int) -> tuple[list[Path], list[Path]]:
    """Temporary checkpoint folders left by a run that stopped mid-save (the caller holds the run
    dir's lock, so none is another run's): complete ones are promoted, the rest removed.
    (promoted, removed)."""
    root = Path(run_dir) / CKPT_DIR
    found = sorted(root.glob(f"{TMP_PREFIX}*")) if root.is_dir() else []
    promoted, removed = [], []
    for p in found:
        if STEP_NAME.fullmatch(p.name[len(TMP_PREFIX) :]) and is_complete(p):
            promoted.append(promote(p, keep))
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return promoted, removed


def is_complete(p: Path) -> bool:
    """A folder whose contents make a whole checkpoint: its manifest, and all its data (a sharded
    checkpoint's index written last, with every shard it lists at its recorded size)."""
    if not (p / META).is_file():
        return False
    try:
        read_meta(p)
    except CheckpointError:
        return False
    if (p / DCP_INDEX).is_file():
        from moeflow.parallel.checkpoint import read_index

        try:
            read_index(p)
        except CheckpointError:
            return False
        return True
    return any((p / f).is_file() for f in (WEIGHTS, WEIGHTS_INDEX, LEGACY_DCP_METADATA))


# -- finding and reading ------------------------------------------------------------------
def is_checkpoint(p: Path) -> bool:
    return (p / META).is_file() and any(
        (p / f).is_file() for f in (DCP_INDEX, LEGACY_DCP_METADATA, WEIGHTS, WEIGHTS_INDEX)
    )


def list_checkpoints(root: Path) -> list[Path]:
    """The checkpoints under `root`, oldest first: folders named exactly step_<8 digits> (copies
    such as step_00000010.bak are not checkpoints)."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and STEP_NAME.fullmatch(p.name) and is_checkpoint(p)]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def damaged_checkpoints(root: Path) -> list[Path]:
    """Folders named like checkpoints (step_<8 digits>) whose contents are not a whole checkpoint."""
    if not Path(root).is_dir():
        return []
    return sorted(
        (p for p in Path(root).iterdir() if p.is_dir() and STEP_NAME.fullmatch(p.name) and not is_complete(p)),
        key=lambda p: p.name,
    )


def find_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint dir itself, or the latest complete checkpoint of a run dir."""
    p = Path(path)
    if is_checkpoint(p):
        return p
    found = list_checkpoints(p / CKPT_DIR) or list_checkpoints(p)
    return found[-1] if found else None


def is_sharded(ckpt: Path) -> bool:
    return (Path(ckpt) / DCP_INDEX).is_file() or (Path(ckpt) / LEGACY_DCP_METADATA).is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is unreadable ({e}); resume from an earlier checkpoint") from None


def read_meta(ckpt: Path) -> dict:
    meta = _read_json(Path(ckpt) / META)
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise CheckpointError(
            f"{Path(ckpt) / META} holds no model config; the file was not written by moeflow or was edited: resume from another checkpoint"
        )
    return meta


def weight_files(ckpt: Path) -> list[Path]:
    """The safetensors files of a consolidated checkpoint: one, or the shards its index lists."""
    ckpt = Path(ckpt)
    if (ckpt / WEIGHTS_INDEX).is_file():
        index = _read_json(ckpt / WEIGHTS_INDEX)
        names = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        bad = [n for n in names if not isinstance(n, str) or not re.fullmatch(r"model-\d{5}\.safetensors", n)]
        if bad or not names:
            raise CheckpointError(
                f"{ckpt / WEIGHTS_INDEX} lists {bad[0] if bad else 'no'} file(s) that are not this checkpoint's weight shards; "
                f"resume from another checkpoint"
            )
        return [ckpt / f for f in names]
    return [ckpt / WEIGHTS]


def verify_weight_files(ckpt: Path) -> None:
    """Consolidated weight files against the digests meta.json records (checkpoints written before
    digests were recorded have none to check)."""
    from moeflow.parallel.shard_files import DIGEST, file_digest

    recorded = read_meta(ckpt).get("digests")
    digests = recorded.get("files") if isinstance(recorded, dict) and recorded.get("kind") == DIGEST else None
    for f in weight_files(ckpt):
        want = digests.get(f.name) if isinstance(digests, dict) else None
        if want is not None and f.is_file() and file_digest(f) != want:
            raise CheckpointError(
                f"checkpoint {ckpt} is damaged: {f.name} does not match its digest in {META} (changed since it was written); "
                f"resume from another checkpoint, or with trainer.verify_checkpoint=false to load it anyway"
            )


def load_model_state(ckpt: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """The consolidated weights of a safetensors checkpoint."""
    if verify:
        verify_weight_files(ckpt)
    out = {}
    for f in weight_files(ckpt):
        try:
            out.update(load_file(str(f)))
        except Exception as e:  # safetensors raises several types for truncated/corrupt files
            raise CheckpointError(
                f"checkpoint {ckpt} has a corrupt {f.name} ({e}); delete it or resume from an earlier checkpoint"
            ) from None
    return out


def load_full_weights(ckpt: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Every weight at full size on the CPU, from either format (tools: export, conversion, upcycling);
    `trust`: also the pickle-based sharded format of earlier versions."""
    if is_sharded(ckpt):
        from moeflow.parallel.checkpoint import read_full_tensors

        return read_full_tensors(ckpt, "model.", trust=trust)
    return load_model_state(ckpt)


def load_trainer_state(ckpt: Path) -> dict | None:
    """Step, schedule and engine (JSON; or an older moeflow's trainer_state.pt, unpickled safely); None if absent."""
    ckpt = Path(ckpt)
    if (ckpt / TRAINER_STATE).is_file():
        state = _read_json(ckpt / TRAINER_STATE)
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{ckpt / TRAINER_STATE} is not a JSON object; the file was edited or damaged: resume from another checkpoint"
            )
        return state
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
        raise CheckpointError(
            f"{path} is not loadable without running code from it ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"moeflow never unpickles checkpoints beyond tensors and plain values: resume from a checkpoint written by moeflow"
        ) from None


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


def check_compatible(
    ckpt: Path, saved_model_cfg: dict, model_cfg: ModelConfig, stored: dict[str, tuple[int, ...]]
) -> None:
    """Refuse a checkpoint whose model shape differs from `model_cfg`'s, naming the differing keys.
    `stored`: the checkpoint's weight names and shapes (its model weights only)."""
    diffs = model_shape_diffs(saved_model_cfg, model_cfg.to_dict())
    if not diffs:
        expected, names = expected_shapes(model_cfg)
        bad = [f"{k}: missing" for k in sorted(set(expected) - set(stored))]
        bad += [
            f"{k}: {stored[k]} vs {shape}"
            for k, shape in sorted(expected.items())
            if k in stored and tuple(stored[k]) != shape
        ]
        bad += [f"{k}: not in this model" for k in sorted(set(stored) - names)]
        if bad:
            diffs.append(f"parameters differ, e.g. {bad[:3]}")
    if diffs:
        raise CheckpointError(
            f"checkpoint {ckpt} is from a different model shape ({'; '.join(diffs)}); "
            f"resume with the checkpoint's model config (see {ckpt / META}) or start a fresh run without resume"
        )


def stored_weight_shapes(ckpt: Path, trust: bool = False) -> dict[str, tuple[int, ...]]:
    """Weight names and shapes of a checkpoint, read from its index or file header (no tensor data)."""
    if is_sharded(ckpt):
        from moeflow.parallel.checkpoint import stored_tensors

        return {
            k[len("model.") :]: shape for k, (shape, _) in stored_tensors(ckpt, trust).items() if k.startswith("model.")
        }
    from safetensors import safe_open

    shapes = {}
    for path in weight_files(ckpt):
        try:
            with safe_open(str(path), "pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as e:
            raise CheckpointError(
                f"checkpoint {ckpt} has a corrupt {path.name} ({e}); delete it or resume from an earlier checkpoint"
            ) from None
    return shapes
