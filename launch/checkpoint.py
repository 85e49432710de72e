"""Checkpoints: safetensors weights + torch-saved trainer state, written atomically.

Layout: <run_dir>/checkpoints/step_00000100/{model.safetensors, trainer_state.pt, meta.json}.
A checkpoint is written under a temporary name and renamed into place, so a killed run
never leaves a half-written checkpoint that `resume` could pick up.
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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model_state: dict, trainer_state: dict, meta: dict, keep: int = 2) -> Path:
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(model_state, str(tmp / "model.safetensors"))
    torch.save(trainer_state, tmp / "trainer_state.pt")
    (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2, default=str))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.json").exists()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def find_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint dir itself, or the latest complete checkpoint of a run dir."""
    p = Path(path)
    if (p / "meta.json").exists() and (p / "model.safetensors").exists():
        return p
    found = list_checkpoints(p / CKPT_DIR) or list_checkpoints(p)
    return found[-1] if found else None


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt} has an unreadable meta.json ({e}); resume from an earlier checkpoint") from None


def load_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(ckpt / "model.safetensors"))
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise CheckpointError(f"checkpoint {ckpt} has a corrupt model.safetensors ({e}); delete it or resume from an earlier checkpoint") from None


def load_trainer_state(ckpt: Path) -> dict:
    try:
        return torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt} has a corrupt trainer_state.pt ({e}); delete it or resume from an earlier checkpoint") from None


SHAPE_KEYS = tuple(ModelConfig.shape_keys())  # the fields moe/model.py marks with shape_field


def model_shape_diffs(saved_model_cfg: dict, model_cfg: dict) -> list[str]:
    """The model-config keys that change parameter shapes and differ, as 'key: checkpoint X vs run Y'.

    A key missing from a config (saved before that field existed) counts as its default.
    """
    defaults = ModelConfig.shape_keys()
    saved = {k: saved_model_cfg.get(k, d) for k, d in defaults.items()}
    run = {k: model_cfg.get(k, d) for k, d in defaults.items()}
    return [f"{k}: checkpoint {saved[k]!r} vs run {run[k]!r}" for k in SHAPE_KEYS if saved[k] != run[k]]


def check_compatible(ckpt: Path, saved_model_cfg: dict, model_cfg: ModelConfig, model_state: dict) -> None:
    """Refuse a checkpoint whose model shape differs from `model_cfg`'s, naming the differing keys."""
    from moeflow.moe.model import Transformer

    diffs = model_shape_diffs(saved_model_cfg, model_cfg.to_dict())
    if not diffs:
        with torch.device("meta"):  # the single-process shapes, at no cost
            expected = state_shapes(Transformer(model_cfg))
        got = {k: tuple(v.shape) for k, v in model_state.items()}
        if expected != got:
            bad = sorted(set(expected.items()) ^ set(got.items()))[:3]
            diffs.append(f"parameters differ, e.g. {bad}")
    if diffs:
        raise CheckpointError(
            f"checkpoint {ckpt} is from a different model shape ({'; '.join(diffs)}); "
            f"resume with the checkpoint's model config (see {ckpt / 'meta.json'}) or start a fresh run without resume"
        )
