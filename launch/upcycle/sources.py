"""What `moeflow upcycle` reads: a moeflow checkpoint of a dense model, or a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import torch

from moeflow.moe import hf_convert as hf
from moeflow.moe.model import Transformer
from moeflow.moe.upcycle import UpcycleError

from .. import checkpoint as ckpt


def detect(source: Path) -> str:
    if ckpt.find_checkpoint(source) is not None:
        return "moeflow"
    if (source / "config.json").is_file():
        return "hf"
    if not source.exists():
        raise UpcycleError(
            f"{source} does not exist; pass a moeflow checkpoint / run dir or a Hugging Face model folder"
        )
    raise UpcycleError(
        f"{source} is neither a moeflow checkpoint (meta.json + model.safetensors, or a run dir with checkpoints/) nor a Hugging Face folder (config.json)"
    )


def load_moeflow_dense(source: Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, dict]:
    from moeflow.moe.model import ModelConfig

    found = ckpt.find_checkpoint(source)
    meta = ckpt.read_meta(found)
    try:
        model_cfg = ModelConfig(**{**meta["model"], "experts_impl": "torch"})  # CPU-safe; the trainer picks its own
    except (KeyError, TypeError, ValueError) as e:
        raise UpcycleError(
            f"{found}/meta.json has no usable model config ({e}); pass a checkpoint written by `moeflow train`"
        ) from None
    model = Transformer(model_cfg)
    state = ckpt.load_full_weights(found)
    ckpt.check_compatible(found, meta["model"], model_cfg, ckpt.stored_weight_shapes(found))
    model.load_state_dict(state, strict=False)
    return model.to(dtype).eval(), meta


def dense_reference(source: Path, kind: str, dense: Transformer, dtype: torch.dtype = torch.float32):
    """The dense model to compare against: transformers' own when it is installed, else the converted one."""
    if kind == "hf":
        try:
            import transformers  # noqa: F401
        except ImportError:
            return dense
        ref = hf.load_hf_model(source, dtype)
        return lambda t: ref(t).logits
    return dense
